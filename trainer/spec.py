"""What the objective's options name, in pure Python: the CLI imports this without torch.

``--select`` is parsed here, once, into a :class:`SelectSpec` (``SIGNAL:FRACTION`` or ``none``). The
names of the registries live here too; the torch implementations are keyed by the same names
(:data:`selkd.trainer.selection.SIGNALS` and ``POLICIES``, :data:`selkd.trainer.losses.LOSSES`; a test
checks that the two agree), so ``--help``, option checks and saved configs never import torch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

__all__ = [
    "DEFAULT_GLOBAL_CAPACITY",
    "FULL_KD",
    "LOSS_NAMES",
    "POLICY_NAMES",
    "SIGNAL_NAMES",
    "SelectSpec",
    "parse_select",
]

# Importance signals, in the order --help lists them (selection.SIGNALS holds their torch code).
SIGNAL_NAMES = (
    "student-entropy",
    "teacher-entropy",
    "student-ce",
    "teacher-ce",
    "ce-ratio",
    "kl",
    "reverse-kl",
    "random",
)
# Selection policies (selection.POLICIES); "none" keeps every valid position (full KD).
POLICY_NAMES = ("sequence", "batch", "global", "stochastic", "curriculum", "none")
# Divergences at the selected positions (losses.LOSSES).
LOSS_NAMES = ("fkl", "rkl", "jsd")
FULL_KD = "none"  # --select none: no signal, every valid position is distilled
DEFAULT_GLOBAL_CAPACITY = 30_000  # scores the global policy's queue keeps (--global-queue)


class SelectSpec(NamedTuple):
    """A parsed ``--select``: the signal that scores positions and the fraction kept."""

    signal: str  # a name in SIGNAL_NAMES, or FULL_KD
    fraction: float  # in (0, 1]; 1.0 for full KD

    @property
    def full_kd(self) -> bool:
        """Whether every valid position is distilled (``--select none``)."""
        return self.signal == FULL_KD


def parse_select(text: str) -> SelectSpec:
    """``"student-entropy:0.2"`` -> ``SelectSpec("student-entropy", 0.2)``; ``"none"`` -> ``("none", 1.0)``.
    Raises ValueError naming ``--select`` and what is wrong."""
    text = text.strip()
    if text == FULL_KD:
        return SelectSpec(FULL_KD, 1.0)
    name, sep, frac = text.partition(":")
    name = name.strip()
    if name not in SIGNAL_NAMES:
        raise ValueError(f"--select {text!r}: unknown signal {name!r}; valid signals: none, {', '.join(SIGNAL_NAMES)}")
    if not sep:
        raise ValueError(f"--select {text!r}: expected SIGNAL:FRACTION (e.g. student-entropy:0.2) or none")
    try:
        fraction = float(frac)
    except ValueError:
        raise ValueError(f"--select {text!r}: {frac!r} is not a number") from None
    if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise ValueError(f"--select {text!r}: fraction must be in (0, 1], got {frac}")
    return SelectSpec(name, fraction)

"""What the objective's options name, in pure Python: the CLI imports this without torch.

``--select`` is parsed here, once, into a :class:`SelectSpec` (``SIGNAL:FRACTION``, the hybrid
``SIGNAL:FRACTION+random:SHARE`` or ``none``). The
names of the registries live here too; the torch implementations are keyed by the same names
(:data:`selkd.trainer.selection.SIGNALS` and ``POLICIES``, :data:`selkd.trainer.losses.LOSSES`; a test
checks that the two agree), so ``--help``, option checks and saved configs never import torch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

__all__ = [
    "DEFAULT_CURRICULUM_STEPS",
    "DEFAULT_GLOBAL_CAPACITY",
    "FULL_KD",
    "LOSS_NAMES",
    "POLICY_NAMES",
    "RANDOM_SHARE",
    "SAMPLING_POLICIES",
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
# Policies that draw positions at random themselves: a hybrid's random share is refused with them.
SAMPLING_POLICIES = ("stochastic",)
# Divergences at the selected positions (losses.LOSSES).
LOSS_NAMES = ("fkl", "rkl", "jsd")
FULL_KD = "none"  # --select none: no signal, every valid position is distilled
DEFAULT_GLOBAL_CAPACITY = 30_000  # scores the global policy's queue keeps (--global-queue)
DEFAULT_CURRICULUM_STEPS = 4_000  # the paper's SELECTION_CURRICULUM_STEPS (--curriculum-steps)
RANDOM_SHARE = "random"  # the one signal a hybrid's second term may name: SIGNAL:FRACTION+random:SHARE


class SelectSpec(NamedTuple):
    """A parsed ``--select``: the signal that scores positions, the fraction kept by the policy and a
    random share: that fraction of each sequence's valid positions more, drawn uniformly from the ones
    the policy left (0 unless the hybrid ``SIGNAL:FRACTION+random:SHARE`` was given)."""

    signal: str  # a name in SIGNAL_NAMES, or FULL_KD
    fraction: float  # in (0, 1]; 1.0 for full KD
    random_share: float = 0.0  # in [0, 1 - fraction]

    @property
    def full_kd(self) -> bool:
        """Whether every valid position is distilled (``--select none``)."""
        return self.signal == FULL_KD


def parse_select(text: str) -> SelectSpec:
    """``"student-entropy:0.2"`` -> ``SelectSpec("student-entropy", 0.2)``; ``"none"`` -> ``("none", 1.0)``;
    ``"student-entropy:0.15+random:0.05"`` -> ``("student-entropy", 0.15, 0.05)``.
    Raises ValueError naming ``--select`` and what is wrong."""
    text = text.strip()
    if text == FULL_KD:
        return SelectSpec(FULL_KD, 1.0)
    main, plus, extra = text.partition("+")
    name, fraction = _term(text, main)
    if not plus:
        return SelectSpec(name, fraction)
    share_name, share = _term(text, extra)
    if share_name != RANDOM_SHARE:
        raise ValueError(
            f"--select {text!r}: the term after '+' must be {RANDOM_SHARE}:SHARE (a random share), got {share_name!r}"
        )
    if fraction + share > 1.0 + 1e-9:
        raise ValueError(f"--select {text!r}: the fraction and the random share add up to more than 1")
    return SelectSpec(name, fraction, share)


def _term(text: str, term: str) -> tuple[str, float]:
    """One ``SIGNAL:FRACTION`` term of ``--select TEXT``: (signal, fraction in (0, 1])."""
    name, sep, frac = term.partition(":")
    name = name.strip()
    if name not in SIGNAL_NAMES:
        raise ValueError(f"--select {text!r}: unknown signal {name!r}; valid signals: none, {', '.join(SIGNAL_NAMES)}")
    if not sep:
        raise ValueError(
            f"--select {text!r}: expected SIGNAL:FRACTION (e.g. student-entropy:0.2), "
            f"SIGNAL:FRACTION+{RANDOM_SHARE}:SHARE or none"
        )
    try:
        fraction = float(frac)
    except ValueError:
        raise ValueError(f"--select {text!r}: {frac!r} is not a number") from None
    if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise ValueError(f"--select {text!r}: fraction must be in (0, 1], got {frac}")
    return name, fraction

"""The target modes by name, and ``--classes``: pure Python (no numpy, torch or zarr).

A target mode is what a cache keeps of the teacher's distribution at each position: ``topk:K`` (the K
most likely classes and the mass of the rest), ``sample:N`` (RS-KD: N draws with replacement, as ids
with counts) or ``full`` (every class). :data:`MODES` says, per mode, what ``--classes`` accepts and
what a trainer may do with its targets; the option parsers of both CLIs read it before anything heavy
is imported. How each mode is computed, stored and read is its codec in :mod:`selkd.cache.codecs`,
registered under the same name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from selkd.cache.codecs import TargetCodec

MAX_DRAWS = 255  # sample:N counts are stored as uint8


@dataclass(frozen=True)
class TargetMode:
    """One target mode as the options see it.

    name:          what ``--classes`` starts with, and the ``mode`` of its :class:`SparseTargets`.
    param:         the letter of its number (``topk:K``); None when it takes none (``full``).
    max_param:     the largest number allowed, and why (``max_reason``); None: no bound of its own.
    within_vocab:  the number may not exceed the teacher's vocabulary.
    noun:          how messages name its targets (default ``<name> targets``).
    losses:        the losses defined on its targets, and why only those (``loss_reason``); None: every loss.
    reverse_kl:    the student's reverse KL to the teacher can be computed from its targets (``--select
                   reverse-kl``).
    renormalize:   ``--topk-renormalize`` applies to its targets.
    kl:            how the held-out forward KL on its targets is known: ``"exact"``, ``"bound"`` (a lower
                   bound: classes are merged) or ``"estimate"`` (unbiased, from draws).
    """

    name: str
    param: str | None = None
    max_param: int | None = None
    max_reason: str = ""
    within_vocab: bool = False
    noun: str = ""
    losses: tuple[str, ...] | None = None
    loss_reason: str = ""
    reverse_kl: bool = True
    renormalize: bool = False
    kl: str = "exact"

    @property
    def targets_noun(self) -> str:
        return self.noun or f"{self.name} targets"

    @property
    def syntax(self) -> str:
        """How ``--classes`` spells it: ``topk:K``, ``full``."""
        return self.name if self.param is None else f"{self.name}:{self.param}"

    def param_problem(self, k: int) -> str | None:
        """What is wrong with ``k`` as this mode's number, or None."""
        if self.max_param is not None and not 1 <= k <= self.max_param:
            return f"{self.param} must be between 1 and {self.max_param} ({self.max_reason})"
        if k < 1:
            return f"{self.param} must be >= 1"
        return None


# In the order messages list them.
MODES: dict[str, TargetMode] = {
    m.name: m
    for m in (
        TargetMode("topk", "K", within_vocab=True, renormalize=True, kl="bound"),
        TargetMode(
            "sample",
            "N",
            max_param=MAX_DRAWS,
            max_reason="counts are stored as uint8",
            noun="sampled targets",
            losses=("fkl",),
            loss_reason="only fkl is unbiased",
            reverse_kl=False,
            kl="estimate",
        ),
        TargetMode("full"),
    )
}


def list_modes(keep: Callable[[TargetMode], bool], syntax: bool = False) -> str:
    """The modes ``keep`` accepts, for a message: ``topk or full`` (``syntax``: ``topk:K or full``)."""
    names = [m.syntax if syntax else m.name for m in MODES.values() if keep(m)]
    return " or ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " or " + names[-1]


@dataclass(frozen=True)
class ClassSpec:
    """Which classes to keep per position (the parsed ``--classes``): ``topk:K``, ``sample:N`` or ``full``."""

    mode: str
    k: int = 0  # K for topk, N for sample, 0 for full

    @classmethod
    def parse(cls, text: str) -> ClassSpec:
        text = text.strip()
        name, sep, num = text.partition(":")
        mode = MODES.get(name)
        if mode is None or bool(sep) != (mode.param is not None):
            raise ValueError(f"--classes {text!r}: expected {list_modes(lambda m: True, syntax=True)}")
        if mode.param is None:
            return cls(name, 0)
        try:
            k = int(num)
        except ValueError:
            raise ValueError(f"--classes {text!r}: {num!r} is not a whole number") from None
        problem = mode.param_problem(k)
        if problem:
            raise ValueError(f"--classes {text!r}: {problem}")
        return cls(name, k)

    @property
    def target_mode(self) -> TargetMode:
        return MODES[self.mode]

    @property
    def codec(self) -> TargetCodec:
        """The codec that computes, stores and reads targets of this mode (imported here, on first use:
        it needs numpy, which option parsing must not load)."""
        from selkd.cache.codecs import codec_for

        return codec_for(self.mode)

    def check_vocab(self, vocab_size: int) -> None:
        mode = self.target_mode
        if mode.within_vocab and self.k > vocab_size:
            raise ValueError(f"--classes {self}: {mode.param} is larger than the teacher's vocabulary ({vocab_size})")

    def __str__(self) -> str:
        return self.mode if self.target_mode.param is None else f"{self.mode}:{self.k}"

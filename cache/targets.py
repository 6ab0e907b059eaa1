"""SparseTargets: the one currency between teacher and student.

The builder makes it from logits (classes.py) and writes it, the reader returns it, the trainer's
online mode makes it live, and every loss consumes it. Leading dimensions ``[...]`` are positions
(``[T]`` flat or ``[B, L]``); the last dimension ``C`` enumerates the classes kept per position.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from selkd.cache.codecs import CODECS, codec_for


@dataclass(frozen=True)
class SparseTargets:
    """Teacher targets at a set of positions.

    mode:          a target mode of :data:`selkd.cache.codecs.CODECS`: "sample" (RS-KD ids with counts),
                   "topk" (k largest + tail), "full" (every class); its codec says which fields are given.
    ids:           [..., C] int64 class ids; None for "full", where class c is column c.
                   Padding slots (sample mode, fewer unique ids than C) have id 0 and logprob -inf.
    logprobs:      [..., C] float32. sample: log(count / num_draws); topk / full: the teacher's
                   log-probabilities at ``temperature``.
    tail_logmass:  [...] float32, topk only: log of the teacher mass outside ``ids``
                   (-inf when the k classes hold all of it); None otherwise.
    num_draws:     N of ``sample:N``; 0 for other modes.
    """

    mode: str
    ids: torch.Tensor | None
    logprobs: torch.Tensor
    tail_logmass: torch.Tensor | None = None
    num_draws: int = 0

    def __post_init__(self) -> None:
        codec = codec_for(self.mode)
        if (self.ids is not None) != codec.ids:
            raise ValueError(f"ids must be {'given' if codec.ids else 'None'} for {self.mode} targets")
        if self.ids is not None and self.ids.shape != self.logprobs.shape:
            raise ValueError(f"ids {tuple(self.ids.shape)} and logprobs {tuple(self.logprobs.shape)} differ")
        if (self.tail_logmass is not None) != codec.tail:
            raise ValueError(f"tail_logmass must be {'given' if codec.tail else 'None'} for {self.mode} targets")

    @property
    def shape(self) -> torch.Size:
        """Leading (position) shape."""
        return self.logprobs.shape[:-1]

    @property
    def num_classes(self) -> int:
        return int(self.logprobs.shape[-1])

    def probs(self) -> torch.Tensor:
        """[..., C] target probabilities (0 at padding)."""
        return self.logprobs.float().exp()

    def counts(self) -> torch.Tensor:
        """[..., C] int64 draw counts (sample mode)."""
        if not CODECS[self.mode].draws:
            raise ValueError(f"counts() needs sample targets, these are {self.mode}")
        return torch.round(self.probs() * self.num_draws).long()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SparseTargets:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return replace(self, ids=mv(self.ids), logprobs=mv(self.logprobs), tail_logmass=mv(self.tail_logmass))

    def select(self, index: torch.Tensor | tuple[torch.Tensor, ...]) -> SparseTargets:
        """Targets at some positions: ``index`` indexes the leading dims (a bool mask of shape
        ``self.shape`` or a tuple of index tensors), giving flat ``[N]`` leading dims."""

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index]

        return replace(self, ids=pick(self.ids), logprobs=pick(self.logprobs), tail_logmass=pick(self.tail_logmass))

    def flatten(self) -> SparseTargets:
        """Leading dims flattened to one ``[T]``."""

        def flat(t: torch.Tensor | None, extra: int) -> torch.Tensor | None:
            if t is None:
                return None
            return t.reshape(-1, *t.shape[t.dim() - extra :]) if extra else t.reshape(-1)

        return replace(
            self,
            ids=flat(self.ids, 1),
            logprobs=flat(self.logprobs, 1),
            tail_logmass=flat(self.tail_logmass, 0),
        )

    @staticmethod
    def concat(items: list[SparseTargets]) -> SparseTargets:
        """Targets of consecutive position ranges ``[T_i, C_i]`` joined into ``[sum(T_i), max(C_i)]``;
        narrower items (sample mode's) are padded with id 0 and logprob -inf."""
        first = items[0]
        width = max(t.num_classes for t in items)

        def widen(t: torch.Tensor, fill: float) -> torch.Tensor:
            return t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=fill)

        ids = None if first.ids is None else torch.cat([widen(t.ids, 0) for t in items])  # type: ignore[arg-type]
        logprobs = torch.cat([widen(t.logprobs, float("-inf")) for t in items])
        tail = None if first.tail_logmass is None else torch.cat([t.tail_logmass for t in items])  # type: ignore[misc]
        return SparseTargets(first.mode, ids, logprobs, tail, first.num_draws)

    @staticmethod
    def stack_padded(items: list[SparseTargets], length: int) -> SparseTargets:
        """Stack per-sequence targets ``[L_i, C_i]`` into ``[B, length, C_max]``; positions past
        ``L_i`` and classes past ``C_i`` are padding (id 0, logprob -inf, tail -inf)."""
        if not items:
            raise ValueError("stack_padded needs at least one item")
        first = items[0]
        c_max = max(t.num_classes for t in items)
        b = len(items)
        logprobs = torch.full((b, length, c_max), float("-inf"), dtype=torch.float32)
        ids = None if first.ids is None else torch.zeros((b, length, c_max), dtype=torch.long)
        tail = None if first.tail_logmass is None else torch.full((b, length), float("-inf"), dtype=torch.float32)
        for i, t in enumerate(items):
            n, c = t.logprobs.shape
            logprobs[i, :n, :c] = t.logprobs
            if ids is not None and t.ids is not None:
                ids[i, :n, :c] = t.ids
            if tail is not None and t.tail_logmass is not None:
                tail[i, :n] = t.tail_logmass
        return SparseTargets(first.mode, ids, logprobs, tail, first.num_draws)

"""One codec per target mode: what a mode computes, stores and reads back.

:mod:`selkd.cache.format` holds what every part has; a :class:`TargetCodec` holds the rest for its mode,
and everything that depends on the mode asks it:

- ``arrays``: the mode's :class:`~selkd.cache.format.ArraySpec` s, stored after ``format.COMMON_ARRAYS``.
  Which rows of them a range of sequences occupies follows from their ``per``
  (:func:`~selkd.cache.format.range_rows`), so a codec has no slicing code;
- ``select``: teacher logits -> :class:`~selkd.cache.targets.SparseTargets` (``classes.py``: the builder
  and online training);
- ``encode``: a batch's SparseTargets -> the rows of its arrays (``writer.py``);
- ``decode`` once per part or range, then ``targets`` per sequence: stored rows -> SparseTargets
  (``reader.py``);
- ``check``: the mode's problems in a part (``verify.py``);
- ``stats``: the mode's sums in a commit record (``info.py`` aggregates them);
- ``mode``: what options may do with its targets (:class:`~selkd.cache.modes.TargetMode`), and ``ids``,
  ``tail``, ``draws``: which fields its SparseTargets carry (their own validation asks).

:data:`CODECS` maps every name of :data:`selkd.cache.modes.MODES` to its codec. numpy is imported here;
torch only where tensors are made, so ``verify`` and ``info`` do not need it to decode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from selkd.cache import format as fmt
from selkd.cache.format import ArraySpec
from selkd.cache.modes import MODES, TargetMode

if TYPE_CHECKING:
    import torch

    from selkd.cache.targets import SparseTargets

Arrays = Mapping[str, np.ndarray]  # a part's (or a range's) arrays by name

# float16 storage: log-probs carry up to ~0.008 nat of rounding each, so sums are checked loosely.
MASS_TOL = 0.02


@functools.cache
def _tensors() -> tuple[Callable[[np.ndarray], torch.Tensor], type[SparseTargets]]:
    """``torch.from_numpy`` and SparseTargets, imported on first use (and once: an import statement per
    sequence read would cost as much as building its targets)."""
    import torch

    from selkd.cache.targets import SparseTargets

    return torch.from_numpy, SparseTargets


def _from_tensors(mode: str, ids: Any, logprobs: Any, tail: Any = None, num_draws: int = 0) -> SparseTargets:
    return _tensors()[1](mode, ids, logprobs, tail, num_draws)


def _from_numpy(
    mode: str, ids: np.ndarray | None, logprobs: np.ndarray, tail: np.ndarray | None = None, num_draws: int = 0
) -> SparseTargets:
    """SparseTargets over numpy arrays (no copy)."""
    from_numpy, sparse_targets = _tensors()
    ids_t = None if ids is None else from_numpy(ids)
    return sparse_targets(mode, ids_t, from_numpy(logprobs), None if tail is None else from_numpy(tail), num_draws)


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return (np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m).squeeze(axis)


def _log_softmax(x: torch.Tensor, temperature: float) -> torch.Tensor:
    return (x / temperature if temperature != 1.0 else x).log_softmax(-1)


class TargetCodec:
    """The interface; each mode's subclass says what it stores (class docstring) and fills it in."""

    name: str
    arrays: tuple[ArraySpec, ...]
    ids: bool = True  # its SparseTargets carry class ids (else class c is column c)
    tail: bool = False  # they carry tail_logmass
    draws: bool = False  # their probabilities are draw counts / num_draws
    uses_probs: bool = False  # select() takes the teacher's probabilities at temperature 1 when T = 1
    uses_lse: bool = False  # select() takes the log-normaliser of the logits at temperature 1 (``lse``)

    @property
    def mode(self) -> TargetMode:
        return MODES[self.name]

    @property
    def specs(self) -> tuple[ArraySpec, ...]:
        """Every array of a part of this mode, in the order they are written."""
        return fmt.COMMON_ARRAYS + self.arrays

    def select(
        self,
        x: torch.Tensor,
        temperature: float,
        k: int,
        generator: torch.Generator | None,
        probs: torch.Tensor | None,
        lse: torch.Tensor | None = None,
    ) -> SparseTargets:
        """Targets [T] from fp32 logits ``x`` [T, V] at ``temperature``; ``probs``: softmax(x) [T, V] when
        ``uses_probs`` and the temperature is 1 (so it is not computed twice; the caller's scratch, which
        select may overwrite), else None; ``lse``: [T] the log-normaliser of ``x`` at temperature 1,
        passed only to a codec with ``uses_lse``."""
        raise NotImplementedError

    def encode(self, targets: SparseTargets, per_seq: np.ndarray) -> dict[str, np.ndarray]:
        """A batch's rows of the mode's arrays: ``targets`` [T] of sequences with ``per_seq`` [S] target
        positions each (in order). A ``seq+1`` array gets per-sequence counts; the writer sums them into
        offsets."""
        raise NotImplementedError

    def decode(self, arrays: Arrays) -> dict[str, np.ndarray]:
        """What a part's (or range's) stored arrays decode to once, by array name (none by default)."""
        return {}

    def targets(self, arrays: Arrays, decoded: Arrays, j: int, rows: slice, k: int) -> SparseTargets:
        """Sequence ``j``'s targets, stored at target rows ``rows`` of ``arrays`` (``decoded``: from
        :meth:`decode`); ``k``: the mode's number."""
        raise NotImplementedError

    def check(self, arrays: Arrays, decoded: Arrays, n_targets: int, vocab: int, k: int) -> Iterator[tuple[str, str]]:
        """(array, problem) for everything wrong with a part's mode arrays (vectorised)."""
        raise NotImplementedError

    def stats(self, arrays: Arrays) -> dict[str, Any]:
        """The mode's sums for the commit record (None: not defined for this mode)."""
        return {"sum_unique_ids": None, "sum_kept_mass": None}


class TopkCodec(TargetCodec):
    """``topk:K``: the K most likely classes and the log of the mass outside them.

    class_ids       int32    [T, K]  ids in rank order (largest log-prob first)
    class_logprobs  uint16   [T, K]  float16 bit patterns, delta-coded along K modulo 2^16 (lossless:
                                     descending negative float16 values have increasing bit patterns,
                                     so the gaps are small and compress)
    tail_logmass    float16  [T]     log of the teacher mass outside the K ids
    """

    name = "topk"
    arrays = (
        ArraySpec("class_ids", "int32", "target", "k"),
        ArraySpec("class_logprobs", "uint16", "target", "k"),
        ArraySpec("tail_logmass", "float16", "target"),
    )
    tail = True
    uses_probs = True
    uses_lse = True

    def select(
        self,
        x: torch.Tensor,
        temperature: float,
        k: int,
        generator: torch.Generator | None,
        probs: torch.Tensor | None,
        lse: torch.Tensor | None = None,
    ) -> SparseTargets:
        if probs is None or lse is None:
            logp = _log_softmax(x, temperature)
            vals, ids = logp.topk(k, dim=-1)
            return _from_tensors(self.name, ids, vals, logp.scatter(-1, ids, float("-inf")).logsumexp(-1))
        # temperature 1, the softmax known: top-k of the logits themselves, and the tail as the sum of the
        # other probabilities (zeroed in place: probs is the caller's scratch), with no [T, V] copy made
        vals, ids = x.topk(k, dim=-1)
        rest = probs.scatter_(-1, ids, 0.0).sum(-1)
        tail = rest.log()
        lost = rest == 0  # the rest underflowed (or is masked): its exact log-sum-exp for those rows
        if k < x.shape[-1] and bool(lost.any()):
            rows = x[lost]
            exact = rows.scatter(-1, ids[lost], float("-inf")).logsumexp(-1) - lse[lost]
            tail[lost] = exact
        return _from_tensors(self.name, ids, vals - lse.unsqueeze(-1), tail)

    def encode(self, targets: SparseTargets, per_seq: np.ndarray) -> dict[str, np.ndarray]:
        bits = targets.logprobs.cpu().numpy().astype(np.float16).view(np.uint16)
        deltas = bits.copy()
        deltas[:, 1:] = bits[:, 1:] - bits[:, :-1]  # uint16 arithmetic wraps: lossless
        return {
            "class_ids": targets.ids.cpu().numpy().astype(np.int32),  # type: ignore[union-attr]
            "class_logprobs": deltas,
            "tail_logmass": targets.tail_logmass.cpu().numpy().astype(np.float16),  # type: ignore[union-attr]
        }

    def decode(self, arrays: Arrays) -> dict[str, np.ndarray]:
        """class_logprobs: float16 [T, K]."""
        return {"class_logprobs": np.cumsum(arrays["class_logprobs"], axis=1, dtype=np.uint16).view(np.float16)}

    def targets(self, arrays: Arrays, decoded: Arrays, j: int, rows: slice, k: int) -> SparseTargets:
        return _from_numpy(
            self.name,
            arrays["class_ids"][rows].astype(np.int64),
            decoded["class_logprobs"][rows].astype(np.float32),
            arrays["tail_logmass"][rows].astype(np.float32),
        )

    def check(self, arrays: Arrays, decoded: Arrays, n_targets: int, vocab: int, k: int) -> Iterator[tuple[str, str]]:
        ids = arrays["class_ids"]
        if ((ids < 0) | (ids >= vocab)).any():
            yield "class_ids", f"ids outside [0, {vocab})"
        kept = decoded["class_logprobs"].astype(np.float32)
        if (kept > 0).any() or np.isnan(kept).any():
            yield "class_logprobs", "log-probs > 0 or NaN"
        tail = arrays["tail_logmass"].astype(np.float32)
        total = np.logaddexp(_logsumexp(kept), tail) if len(tail) else tail
        if (np.abs(total) > MASS_TOL).any():
            yield "tail_logmass", f"kept mass + tail mass differs from 1 by more than {MASS_TOL} nat"

    def stats(self, arrays: Arrays) -> dict[str, Any]:
        kept = self.decode(arrays)["class_logprobs"].astype(np.float64)
        return {**super().stats(arrays), "sum_kept_mass": float(np.exp(kept).sum())}


class SampleCodec(TargetCodec):
    """``sample:N`` (RS-KD): N draws with replacement from the teacher, as the distinct ids and their counts.

    num_classes    uint8  [T]    distinct ids drawn at each position
    class_offsets  int64  [S+1]  entry offsets of each sequence's first target
    class_ids      int32  [E]    ids ascending within a position, delta-coded (lossless: the first id
                                 of a position, then the gaps, which are small and compress)
    class_counts   uint8  [E]    draw counts (sum to N per position)
    """

    name = "sample"
    arrays = (
        ArraySpec("num_classes", "uint8", "target"),
        ArraySpec("class_offsets", "int64", "seq+1"),
        ArraySpec("class_ids", "int32", "entry"),
        ArraySpec("class_counts", "uint8", "entry"),
    )
    draws = True
    uses_probs = True

    def select(
        self,
        x: torch.Tensor,
        temperature: float,
        k: int,
        generator: torch.Generator | None,
        probs: torch.Tensor | None,
    ) -> SparseTargets:
        from selkd.cache.classes import sample_counts

        ids, counts = sample_counts(probs if probs is not None else (x / temperature).softmax(-1), k, generator)
        return _from_tensors(self.name, ids, (counts.float() / k).log(), None, k)  # -inf at padding (count 0)

    def encode(self, targets: SparseTargets, per_seq: np.ndarray) -> dict[str, np.ndarray]:
        """Padded [T, U] ids (ascending within a row) with counts (0 = padding) -> the kept entries."""
        ids = targets.ids.cpu().numpy()  # type: ignore[union-attr]
        counts = (targets.logprobs.exp() * targets.num_draws).round().cpu().numpy().astype(np.int64)
        keep = counts > 0
        num = keep.sum(axis=1).astype(np.uint8)
        entries = np.zeros(len(per_seq), np.int64)
        if len(num):
            entries = np.add.reduceat(num.astype(np.int64), fmt.segment_starts(per_seq))
            entries[per_seq == 0] = 0
        return {
            "num_classes": num,
            "class_offsets": entries,
            "class_ids": fmt.delta_encode_segments(ids[keep], num.astype(np.int64)).astype(np.int32),
            "class_counts": counts[keep].astype(np.uint8),
        }

    def decode(self, arrays: Arrays) -> dict[str, np.ndarray]:
        """class_ids: the absolute ids, int64 [E]."""
        return {"class_ids": fmt.delta_decode_segments(arrays["class_ids"], arrays["num_classes"].astype(np.int64))}

    def targets(self, arrays: Arrays, decoded: Arrays, j: int, rows: slice, k: int) -> SparseTargets:
        num = arrays["num_classes"][rows].astype(np.int64)
        entries = slice(int(arrays["class_offsets"][j]), int(arrays["class_offsets"][j + 1]))
        ids = fmt.pad_rows(decoded["class_ids"][entries], num, 0, np.int64)
        counts = fmt.pad_rows(arrays["class_counts"][entries], num, 0, np.int64)
        logprobs = np.log(np.where(counts > 0, counts, 1) / k).astype(np.float32)
        logprobs[counts == 0] = -np.inf
        return _from_numpy(self.name, ids, logprobs, None, k)

    def check(self, arrays: Arrays, decoded: Arrays, n_targets: int, vocab: int, k: int) -> Iterator[tuple[str, str]]:
        num = arrays["num_classes"].astype(np.int64)
        counts = arrays["class_counts"].astype(np.int64)
        co = arrays["class_offsets"]
        if len(num) != n_targets or (num < 1).any():
            yield "num_classes", "every target position needs >= 1 class"
        if co[0] != 0 or co[-1] != len(counts) or (np.diff(co) < 0).any():
            yield "class_offsets", "offsets not monotonic or not spanning class_ids"
        if int(num.sum()) != len(counts):
            yield "class_counts", "entries != sum(num_classes)"
            return
        if not len(num) or not (num >= 1).all():
            return
        sums = np.add.reduceat(counts, fmt.segment_starts(num))
        if (sums != k).any() or (counts < 1).any():
            yield "class_counts", f"counts do not sum to N={k} at every position"
        ids = decoded["class_ids"]
        if ((ids < 0) | (ids >= vocab)).any():
            yield "class_ids", f"ids outside [0, {vocab})"
        gaps = arrays["class_ids"].astype(np.int64)
        not_first = np.ones(len(gaps), dtype=bool)
        not_first[fmt.segment_starts(num)] = False
        if (gaps[not_first] <= 0).any():
            yield "class_ids", "ids not strictly ascending within a position"

    def stats(self, arrays: Arrays) -> dict[str, Any]:
        return {
            **super().stats(arrays),
            "sum_unique_ids": int(arrays["num_classes"].astype(np.int64).sum()),
            "n_entries": int(arrays["class_ids"].shape[0]),
        }


class FullCodec(TargetCodec):
    """``full``: every class.

    class_logprobs  float16  [T, V]  every log-prob
    """

    name = "full"
    arrays = (ArraySpec("class_logprobs", "float16", "target", "vocab"),)
    ids = False
    uses_lse = True

    def select(
        self,
        x: torch.Tensor,
        temperature: float,
        k: int,
        generator: torch.Generator | None,
        probs: torch.Tensor | None,
        lse: torch.Tensor | None = None,
    ) -> SparseTargets:
        if lse is not None and temperature == 1.0:  # the normaliser is known: one pass, not a second softmax
            return _from_tensors(self.name, None, x - lse.unsqueeze(-1))
        return _from_tensors(self.name, None, _log_softmax(x, temperature))

    def encode(self, targets: SparseTargets, per_seq: np.ndarray) -> dict[str, np.ndarray]:
        return {"class_logprobs": targets.logprobs.cpu().numpy().astype(np.float16)}

    def targets(self, arrays: Arrays, decoded: Arrays, j: int, rows: slice, k: int) -> SparseTargets:
        return _from_numpy(self.name, None, arrays["class_logprobs"][rows].astype(np.float32))

    def check(self, arrays: Arrays, decoded: Arrays, n_targets: int, vocab: int, k: int) -> Iterator[tuple[str, str]]:
        full = arrays["class_logprobs"].astype(np.float32)
        if full.shape[1:] != (vocab,):
            yield "class_logprobs", f"width != vocab {vocab}"
        if (full > 0).any() or np.isnan(full).any():
            yield "class_logprobs", "log-probs > 0 or NaN"
        if len(full) and (np.abs(_logsumexp(full)) > MASS_TOL).any():
            yield "class_logprobs", "probabilities do not sum to 1"


CODECS: dict[str, TargetCodec] = {c.name: c for c in (TopkCodec(), SampleCodec(), FullCodec())}


def codec_for(mode: str) -> TargetCodec:
    """The codec of target mode ``mode``; ValueError naming the known modes for any other name."""
    codec = CODECS.get(mode)
    if codec is None:
        raise ValueError(f"unknown target mode {mode!r}; expected one of {', '.join(CODECS)}")
    return codec

"""Streaming a cache into training batches: order, rank/worker split, reading, prefetching, resuming.

:class:`CacheStream` is an ``IterableDataset`` that yields :class:`~selkd.trainer.batch.Batch` objects
(collated inside the DataLoader workers) of one split of a cache; :func:`selkd.trainer.loader.make_loader`
wraps it in a DataLoader that counts what the training loop has taken, so its ``state_dict()`` resumes
exactly.

How the order is made (identical on every rank and worker, a function of ``seed`` and ``epoch`` only)
------------------------------------------------------------------------------------------------------
1. **Units.** Every committed part of the split (in part-name order) is cut into *units*: runs of
   ``unit_size`` (default 32) consecutive stored sequences that are kept (all of them, or the top
   ``sample_ratio`` by score). A unit never crosses a part, so it is read as one contiguous slice of
   each array of its part.
2. **Epoch permutation.** ``rng = numpy.random.default_rng([seed, epoch])`` permutes the units; the
   permuted units are grouped into *windows* of ``shuffle_window`` (default 4) units, and the sequences
   inside each window are shuffled with the same generator. Concatenating the windows gives the
   epoch's *global order* ``G`` of all N kept sequences: each sequence appears exactly once, and a
   batch mixes sequences from up to ``shuffle_window`` places of the corpus. ``shuffle=False`` gives
   the stored order.
3. **Ranks.** ``G`` is cut into *global batches* of ``batch_size`` sequences. With ``world_size`` W,
   global step ``s`` consists of global batches ``s*W, ..., s*W + W - 1`` and rank ``r`` takes global
   batch ``s*W + r``: the ranks never overlap and every rank gets ``steps_per_epoch() =
   N // (batch_size * W)`` batches; the remainder ``N % (batch_size * W)`` is dropped (it differs
   per epoch, as ``G`` does). With ``drop_last=False`` the last step is completed instead: with W = 1
   by a shorter last batch, with W > 1 by wrapping around to the start of ``G`` (as PyTorch's
   ``DistributedSampler`` pads), so every rank still gets the same number of full batches.
4. **Workers.** A rank's batches ``0, 1, 2, ...`` are dealt round-robin to its DataLoader workers
   (worker ``w`` of ``n`` builds batches ``w, w + n, w + 2n, ...`` in that order). The DataLoader
   takes one batch from each worker in turn, so the training loop sees the rank's batches in order,
   whatever ``num_workers`` is: the order depends on (seed, epoch, batch_size, world_size, rank)
   only, never on the number of workers.

Resuming
--------
The stream keeps a cursor: ``epoch``, ``samples`` (sequences of ``G`` consumed by all ranks together
in this epoch: ``batch_size * world_size`` per step, independent of the world size) and ``step``
(batches this rank consumed in this epoch). :class:`~selkd.trainer.loader.StatefulLoader` advances it when the training
loop *takes* a batch (not when a worker prefetches one); when the last batch of an epoch is taken the
cursor moves to the start of the next epoch. ``state_dict()`` is JSON-serialisable; a fresh
stream and loader given ``load_state_dict(state)`` start their next iteration at global offset
``samples`` of epoch ``epoch``, i.e. rank ``r``'s step ``s`` is global batch ``samples / batch_size +
s*W + r``. With the same world size this is exactly the batches ``k, k+1, ...`` of the uninterrupted
run (and every later epoch is the same, as the order depends on (seed, epoch) only); with another
world size or batch size it continues from the same point of the same global order. Workers are not
persistent: each iteration starts them from the cursor.

Reading
-------
Each DataLoader worker opens the cache itself (``open_cache`` inside the worker; a reader inherited
through ``fork`` is never used, and remote URLs use the ``spawn`` start method because s3fs is not
fork-safe). A unit is read as one slice per array, the slices fetched concurrently through zarr's
event loop (:meth:`~selkd.cache.reader.CacheReader.read_range`: the reader checks the arrays' codecs
and dtypes, every chunk's crc32c in a version-2 cache, and names the part and the array of a chunk
that fails), and decoded once; a worker
keeps the units of its current and next window, so it decodes each unit it needs at most once per
epoch. A unit that holds sequences of several workers' (or ranks') batches is read by each of them;
smaller units (or larger batches) read less twice.

Sample selection (``sample_ratio``) needs the scores a ``--sample-ratio`` build stores for every
training sequence: the top ``ceil(sample_ratio * n)`` of the n stored training sequences by score
(ties: lower sequence index) are streamed. Incomplete caches are refused (the reader's
``CacheError``) unless ``allow_missing_parts``, which streams the committed parts and warns at every
``set_epoch`` and epoch start how many parts are missing.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from selkd.cache import format as fmt
from selkd.cache.reader import CacheError, CacheReader, PartRecord, open_cache
from selkd.cache.store import is_url
from selkd.trainer.batch import Batch
from selkd.trainer.unit_reader import Layout, UnitReader

STATE_VERSION = 1

__all__ = ["CacheStream", "WorkerFailure"]


@dataclass(frozen=True)
class WorkerFailure:
    """A :class:`~selkd.cache.reader.CacheError` (e.g. a corrupt chunk) met in a DataLoader worker
    process, sent to the training process in place of a batch; the loader raises ``error`` there.
    (torch would re-raise it as a ``RuntimeError`` holding the worker's traceback, hiding the
    one-line message that names the part and the array.)"""

    error: CacheError


def mp_context(url: str) -> str | None:
    """DataLoader start method: ``spawn`` for URLs (s3fs is not fork-safe), ``fork`` for local paths."""
    if is_url(url):
        return "spawn"
    import multiprocessing as mp

    return "fork" if "fork" in mp.get_all_start_methods() else None


# --- the stream ----------------------------------------------------------------------------------


def _check_arguments(
    split: str,
    batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    sample_ratio: float | None,
    unit_size: int,
    shuffle_window: int,
) -> None:
    """:class:`CacheStream`'s argument checks (ValueError naming the argument)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size {world_size})")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, not {seed}")
    if unit_size < 1 or shuffle_window < 1:
        raise ValueError("unit_size and shuffle_window must be >= 1")
    if sample_ratio is not None and not 0.0 < sample_ratio <= 1.0:
        raise ValueError(f"sample_ratio must be in (0, 1], not {sample_ratio}")
    if sample_ratio is not None and split != "train":
        raise ValueError(f"sample_ratio applies to the train split only, not {split!r}")


class CacheStream(IterableDataset):
    """Streams batches (already collated in the workers) of one split of a cache.

    See the module docstring for the order, the rank/worker split and resuming. ``unit_size`` and
    ``shuffle_window`` shape the order (keep them when resuming).
    """

    def __init__(
        self,
        url: str,
        *,
        split: str = "train",
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        storage_options: dict[str, Any] | None = None,
        sample_ratio: float | None = None,
        allow_missing_parts: bool = False,
        pad_id: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        unit_size: int = 32,
        shuffle_window: int = 4,
    ) -> None:
        super().__init__()
        _check_arguments(split, batch_size, seed, rank, world_size, sample_ratio, unit_size, shuffle_window)
        self.url = str(url)
        self.split = split
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.storage_options = dict(storage_options or {})
        self.sample_ratio = sample_ratio
        self.allow_missing_parts = allow_missing_parts
        self.pad_id = pad_id
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.unit_size = unit_size
        self.shuffle_window = shuffle_window
        # cursor
        self._epoch = 0
        self._samples = 0  # global sequences consumed in this epoch (all ranks)
        self._step = 0  # batches this rank consumed in this epoch
        self._iteration = 0  # bumped by each new iteration; older iterators stop counting
        self._warned_epoch: int | None = None
        self._resume_pending = False  # set by load_state_dict until the next iteration or set_epoch
        # opened here so that an incomplete cache fails now; never used in another process
        self._reader: CacheReader | None = open_cache(
            self.url, self.storage_options or None, require_complete=not allow_missing_parts
        )
        self._reader_pid = os.getpid()
        self._layout = self._make_layout(self._reader)
        self._order_cache: tuple[int, np.ndarray] | None = None
        self.last_units_read = 0  # units decoded by the last in-process iteration (diagnostics)
        if self.steps_per_epoch() == 0:
            raise ValueError(
                f"{self.url}: the {split!r} split streams {self.num_sequences} sequences, fewer than batch_size * "
                f"world_size = {batch_size * world_size}: no batch per epoch (lower batch_size or pass drop_last=False)"
            )

    # --- pickling (spawned workers) and per-process readers --------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_reader"] = None
        state["_reader_pid"] = None
        state["_order_cache"] = None
        return state

    def _process_reader(self) -> CacheReader:
        """This process's reader: opened here (``open_cache``) unless this process opened one."""
        if self._reader is None or self._reader_pid != os.getpid():
            self._reader = open_cache(self.url, self.storage_options or None, require_complete=False)
            self._reader_pid = os.getpid()
            self._order_cache = None
        return self._reader

    # --- layout and order ------------------------------------------------------------------------
    def _make_layout(self, reader: CacheReader) -> Layout:
        parts = [p for p in reader.split_parts(self.split) if p.n_sequences > 0]
        if not parts:
            raise ValueError(f"{self.url}: no committed sequences in the {self.split!r} split")
        kept = [np.arange(p.n_sequences, dtype=np.int64) for p in parts]
        if self.sample_ratio is not None:
            kept = self._select(reader, parts)
        seq_part = np.concatenate([np.full(len(k), i, dtype=np.int32) for i, k in enumerate(kept)])
        seq_pos = np.concatenate(kept)
        bounds = [0]
        for k in kept:
            base = bounds[-1]
            bounds.extend(base + min(s + self.unit_size, len(k)) for s in range(0, len(k), self.unit_size))
        unit_bounds = np.asarray(bounds, dtype=np.int64)
        seq_unit = np.repeat(np.arange(len(bounds) - 1, dtype=np.int64), np.diff(unit_bounds))
        return Layout(
            [p.name for p in parts],
            seq_part,
            seq_pos,
            unit_bounds,
            seq_unit,
            len(reader.missing_parts),
            reader.expected_parts,
        )

    def _select(self, reader: CacheReader, parts: list[PartRecord]) -> list[np.ndarray]:
        """Per part, the sorted positions of the top ``sample_ratio`` stored sequences by score."""
        scores = reader.scores()
        if scores is None:
            raise ValueError(
                f"{self.url}: sample_ratio={self.sample_ratio} needs sample scores, but this cache has none "
                "(it was built without --sample-ratio); rebuild with `selkd-cache build --sample-ratio ...` "
                "or train without sample_ratio"
            )
        idx, val = scores
        stored = [reader.read_slices(p, {"seq_index": slice(None)})["seq_index"] for p in parts]
        all_stored = np.concatenate(stored).astype(np.int64)
        where = np.searchsorted(idx, all_stored)
        where = np.minimum(where, len(idx) - 1)
        found = idx[where] == all_stored
        if not found.all():
            raise ValueError(
                f"{self.url}: sample_ratio needs a score for every stored training sequence, but "
                f"{int((~found).sum())} of {len(all_stored)} have none (incomplete scoring); rerun the build"
            )
        n = len(all_stored)
        keep = max(1, math.ceil(self.sample_ratio * n))  # type: ignore[operator]
        order = np.lexsort((all_stored, -val[where].astype(np.float64)))
        chosen = np.zeros(n, dtype=bool)
        chosen[order[:keep]] = True
        out, base = [], 0
        for s in stored:
            out.append(np.flatnonzero(chosen[base : base + len(s)]).astype(np.int64))
            base += len(s)
        return out

    def _order(self, epoch: int) -> np.ndarray:
        """The epoch's global order: flat layout indices [N]."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        lay = self._layout
        n = lay.num_sequences
        if not self.shuffle:
            order = np.arange(n, dtype=np.int64)
        else:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(lay.num_units)
            starts = lay.unit_bounds[:-1][perm]
            lengths = np.diff(lay.unit_bounds)[perm]
            out_starts = fmt.segment_starts(lengths)
            order = np.arange(n, dtype=np.int64) + np.repeat(starts - out_starts, lengths)
            window = np.repeat(np.arange(lay.num_units, dtype=np.int64) // self.shuffle_window, lengths)
            order = order[np.lexsort((rng.random(n), window))]
        self._order_cache = (epoch, order)
        return order

    # --- sizes and the cursor ----------------------------------------------------------------------
    @property
    def reader(self) -> CacheReader:
        """This process's :class:`CacheReader` of the cache (header, parts, ``get``)."""
        return self._process_reader()

    @property
    def num_sequences(self) -> int:
        """Sequences streamed per epoch (after sample selection), before the dropped remainder."""
        return self._layout.num_sequences

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def missing_parts(self) -> int:
        return self._layout.missing_parts

    def _steps_from(self, samples: int) -> int:
        left = max(0, self.num_sequences - samples)
        per_step = self.batch_size * self.world_size
        return left // per_step if self.drop_last else -(-left // per_step)

    def steps_per_epoch(self) -> int:
        """Batches per rank in a whole epoch (identical on every rank)."""
        return self._steps_from(0)

    def steps_remaining(self) -> int:
        """Batches per rank that the next iteration yields (the rest of the current epoch)."""
        return self._steps_from(self._samples)

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of ``epoch``, except right after :meth:`load_state_dict` (before any
        iteration) when ``epoch`` is the loaded one: the resumed position is kept, so that
        ``for epoch in range(state["epoch"], n): set_epoch(epoch); ...`` continues exactly. Warns
        about missing parts."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, not {epoch}")
        if not (self._resume_pending and epoch == self._epoch):
            self._epoch, self._samples, self._step = epoch, 0, 0
        self._resume_pending = False
        self._warn_missing(force=True)

    def _warn_missing(self, force: bool = False) -> None:
        lay = self._layout
        if not lay.missing_parts or (not force and self._warned_epoch == self._epoch):
            return
        self._warned_epoch = self._epoch
        warnings.warn(
            f"{self.url}: epoch {self._epoch}: {lay.missing_parts} of {lay.expected_parts} parts of the cache are "
            f"missing (not committed); streaming the {len(lay.part_names)} committed {self.split} parts "
            f"({self.num_sequences} sequences)",
            UserWarning,
            stacklevel=3,
        )

    def _consume(self, iteration: int) -> None:
        """The consumer took one batch of iteration ``iteration``."""
        if iteration != self._iteration:
            return
        self._samples += self.batch_size * self.world_size
        self._step += 1
        if self._steps_from(self._samples) == 0:  # epoch done: the cursor moves to the next one
            self._epoch, self._samples, self._step = self._epoch + 1, 0, 0

    def _begin(self) -> tuple[int, int, int]:
        """Start an iteration in the consuming process: (iteration id, epoch, samples)."""
        self._iteration += 1
        self._resume_pending = False
        self._warn_missing()
        return self._iteration, self._epoch, self._samples

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: ``epoch``, ``step`` (batches this rank consumed in the epoch) and
        ``samples`` (sequences consumed in the epoch by all ranks: the world-size-independent counter
        that resuming uses; ``global_batches`` is the same in batches), plus the settings that shape
        the order, checked by :meth:`load_state_dict`."""
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "step": self._step,
            "samples": self._samples,
            "global_batches": self._samples // self.batch_size,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "unit_size": self.unit_size,
            "shuffle_window": self.shuffle_window,
            "sample_ratio": self.sample_ratio,
            "split": self.split,
            "num_sequences": self.num_sequences,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (also one saved with another world size or batch size)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        for key in ("seed", "shuffle", "unit_size", "shuffle_window", "sample_ratio", "split"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"cannot resume: the data state was saved with {key}={state.get(key)!r} but this stream has "
                    f"{key}={getattr(self, key)!r}, which gives another order; use the saved value"
                )
        if state.get("num_sequences") != self.num_sequences:
            warnings.warn(
                f"{self.url}: the data state was saved with {state.get('num_sequences')} sequences per epoch, the "
                f"cache now gives {self.num_sequences} (parts were added?); the order differs from the saved run",
                UserWarning,
                stacklevel=2,
            )
        self._epoch = int(state["epoch"])
        self._samples = int(state["samples"])
        same_shape = state.get("world_size") == self.world_size and state.get("batch_size") == self.batch_size
        self._step = int(state["step"]) if same_shape else self._samples // (self.batch_size * self.world_size)
        self._iteration += 1  # iterators started before the load stop counting
        self._resume_pending = True
        if self._steps_from(self._samples) == 0:
            self._epoch, self._samples, self._step = self._epoch + 1, 0, 0

    # --- producing batches -----------------------------------------------------------------------
    def _batch_indices(self, epoch: int, samples: int, step: int) -> np.ndarray:
        """Flat layout indices of this rank's batch ``step`` of an iteration starting at ``samples``."""
        order = self._order(epoch)
        n = len(order)
        a = samples + (step * self.world_size + self.rank) * self.batch_size
        b = a + self.batch_size
        if self.world_size == 1:
            b = min(b, n)  # drop_last=False: a shorter last batch
        return order[np.arange(a, b) % n]  # world_size > 1: wrap around (drop_last=False only)

    def _generate(
        self, epoch: int, samples: int, worker: int = 0, num_workers: int = 1, units: UnitReader | None = None
    ) -> Iterator[Batch]:
        """This worker's share of this rank's batches of the iteration starting at (epoch, samples)."""
        units = units or UnitReader(self, self._layout)
        try:
            for step in range(worker, self._steps_from(samples), num_workers):
                yield units.batch(self._batch_indices(epoch, samples, step), self.pad_id)
        finally:
            self.last_units_read = units.units_read

    def __iter__(self) -> Iterator[Batch | WorkerFailure]:
        info = get_worker_info()
        if info is not None:  # a DataLoader worker: its share, from the cursor it was started with
            try:
                yield from self._generate(self._epoch, self._samples, info.id, info.num_workers)
            except CacheError as err:  # the loader raises it again in the training process
                yield WorkerFailure(err)
            return
        iteration, epoch, samples = self._begin()  # direct iteration: every yield is a consumed batch
        for batch in self._generate(epoch, samples):
            self._consume(iteration)
            yield batch

    def __repr__(self) -> str:
        return (
            f"CacheStream({self.url!r}, split={self.split!r}, batch_size={self.batch_size}, rank={self.rank}/"
            f"{self.world_size}, epoch={self._epoch}, samples={self._samples}, sequences={self.num_sequences})"
        )

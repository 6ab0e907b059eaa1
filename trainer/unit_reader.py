"""A split's kept sequences cut into units (:class:`Layout`) and the per-process reading of them
(:class:`UnitReader`): a unit is a run of consecutive kept sequences of one part, read as one slice per
array and decoded once, the units of the current and the next shuffle window kept. The order in which
:class:`~selkd.trainer.data.CacheStream` asks for them, and why units are cut so, is in
:mod:`selkd.trainer.data`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from zarr.core.array import AsyncArray

from selkd.cache.reader import PartData
from selkd.trainer.batch import Batch, collate

if TYPE_CHECKING:
    from selkd.trainer.data import CacheStream


@dataclass
class Layout:
    """The kept sequences of a split, in stored order, cut into units."""

    part_names: list[str]
    seq_part: np.ndarray  # int32 [N]: index into part_names
    seq_pos: np.ndarray  # int64 [N]: position inside the part
    unit_bounds: np.ndarray  # int64 [U + 1]: units are flat ranges [unit_bounds[u], unit_bounds[u+1])
    seq_unit: np.ndarray  # int64 [N]
    missing_parts: int  # parts of the build plan that are not committed (all splits)
    expected_parts: int

    @property
    def num_sequences(self) -> int:
        return int(self.seq_pos.shape[0])

    @property
    def num_units(self) -> int:
        return int(self.unit_bounds.shape[0] - 1)


class UnitReader:
    """Per-process (or per-thread) reading state: its own reader, opened arrays and decoded units."""

    def __init__(self, stream: CacheStream, layout: Layout) -> None:
        self.stream, self.layout = stream, layout
        self.reader = stream.reader
        records = {p.name: p for p in self.reader.parts}
        self.parts = [records[name] for name in layout.part_names]
        self.arrays: OrderedDict[int, dict[str, AsyncArray]] = OrderedDict()
        self.units: OrderedDict[int, tuple[PartData, int]] = OrderedDict()
        self.capacity = 2 * stream.shuffle_window + 1  # units of the current and the next window
        self.units_read = 0

    def _part_arrays(self, p: int) -> dict[str, AsyncArray]:
        if p in self.arrays:
            self.arrays.move_to_end(p)
            return self.arrays[p]
        opened = self.reader.open_part(self.parts[p])
        self.arrays[p] = opened
        while len(self.arrays) > self.capacity:
            self.arrays.popitem(last=False)
        return opened

    def unit(self, u: int) -> tuple[PartData, int]:
        """The decoded unit ``u`` and the part position of its first sequence."""
        if u in self.units:
            self.units.move_to_end(u)
            return self.units[u]
        lay = self.layout
        lo, hi = int(lay.unit_bounds[u]), int(lay.unit_bounds[u + 1])
        p = int(lay.seq_part[lo])
        start, stop = int(lay.seq_pos[lo]), int(lay.seq_pos[hi - 1]) + 1
        data = self.reader.read_range(self.parts[p], start, stop, self._part_arrays(p))
        self.units_read += 1
        self.units[u] = (data, start)
        while len(self.units) > self.capacity:
            self.units.popitem(last=False)
        return data, start

    def batch(self, flat: np.ndarray, pad_id: int) -> Batch:
        """The batch of the sequences ``flat`` (flat layout indices [B]), padded with ``pad_id``."""
        lay = self.layout
        seqs = []
        for i in flat.tolist():
            data, start = self.unit(int(lay.seq_unit[i]))
            seqs.append(data.sequence(int(lay.seq_pos[i]) - start))
        return collate(seqs, pad_id)

"""Units of work of the token store: the resolved sources cut into pieces one worker tokenizes alone.

A unit is a :class:`~selkd.cache.sources.Source` narrowed to a piece that can be read on its own:
a whole ``.txt``/``.jsonl``/``.jsonl.gz`` file (gzip cannot be entered in the middle; a large file
is still written as several shards), one row group of a parquet file, one contiguous shard per Arrow
file of a ``save_to_disk`` dataset, one shard per data file of a ``datasets:`` spec. The list is a
deterministic function of the data (file listing, parquet footers, dataset metadata), so every worker
and every rerun derives the same one; it is stored with the token store (``selkd/units.json``) and a
rerun compares the sources it finds with the stored ones.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from selkd.cache.documents import load_saved_dataset, load_streaming_dataset, parquet_row_groups
from selkd.cache.sources import DATASETS, HF_DATASET, Source


def _contiguous_starts(n_rows: int, n_parts: int) -> list[int]:
    """First row of each of ``datasets.Dataset.shard(n_parts, i, contiguous=True)``'s shards."""
    div, mod = divmod(n_rows, n_parts)
    return [div * i + min(i, mod) for i in range(n_parts)]


def source_units(source: Source) -> list[Source]:
    """The units of one source, in reading order."""
    if source.kind == "parquet":
        rows = parquet_row_groups(source)
        starts = [sum(rows[:g]) for g in range(len(rows))]
        return [_narrow(source, g, len(rows), starts[g]) for g in range(len(rows))]
    if source.kind == HF_DATASET:
        ds = load_saved_dataset(source)
        n = max(1, min(len(ds.cache_files), ds.num_rows))
        return [_narrow(source, i, n, start) for i, start in enumerate(_contiguous_starts(ds.num_rows, n))]
    if source.kind == DATASETS:
        n = max(1, int(load_streaming_dataset(source).num_shards))
        return [_narrow(source, i, n, 0) for i in range(n)]
    return [source]


def _narrow(source: Source, part: int, n_parts: int, first_row: int) -> Source:
    return Source(source.path, source.kind, part, n_parts, first_row, source.size, source.options)


def plan_units(sources: list[Source]) -> list[Source]:
    """The units of every source, in the order of the sources."""
    return [unit for source in sources for unit in source_units(source)]


def source_record(source: Source) -> dict[str, Any]:
    """What identifies a source in ``selkd/units.json`` (compared on a rerun to notice changed data)."""
    return {"path": str(source.path), "kind": source.kind, "size": source.size}


def unit_record(unit: Source) -> dict[str, Any]:
    record = asdict(unit)
    record.pop("options")
    record["path"] = str(unit.path)
    return record


def unit_from_record(record: dict[str, Any], options: dict[str, Any] | None) -> Source:
    """The unit a :func:`unit_record` describes; a local path becomes a ``Path`` again."""
    path: Path | str = record["path"]
    if record["kind"] != DATASETS and "://" not in str(path):
        path = Path(path)
    return Source(path, record["kind"], record["part"], record["n_parts"], record["first_row"], record["size"], options)

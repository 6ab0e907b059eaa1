"""The selkd cache format, version 2: names, dtypes, chunking, checksums and the shared encodings.

This module and :mod:`selkd.cache.codecs` (the arrays each target mode adds, and how they are encoded)
are the single source of truth for the on-store layout (docs/cache-format.md describes the same thing
for people who read a cache with zarr alone). It is pure numpy.

Per part ``parts/<name>/`` (a zarr group), with S sequences, P tokens and T = P - S target
positions (a sequence of L tokens has L - 1 next-token targets; target j of sequence i sits at
``seq_offsets[i] - i + j``), every mode stores:

=================  ============  =========  ===============================================
array              dtype         shape      meaning
=================  ============  =========  ===============================================
seq_index          int64         [S]        global sequence index in the packed corpus
seq_offsets        int64         [S+1]      token offsets of each sequence
input_ids          int32         [P]        the tokens
doc_start          bool          [P]        True at the first token of a document
loss_mask          bool          [P]        True at a trained token (optional: absent = all True)
teacher_entropy    float16       [T]        teacher entropy at T=1 (nats), over the C classes
teacher_logprob    float16       [T]        teacher log-prob (T=1) of the actual next token
=================  ============  =========  ===============================================

``loss_mask`` says which targets are distilled: target j (position j, predicting token j + 1) is
trained iff ``loss_mask[j + 1]`` (:func:`trained_targets`), so with ``selkd-cache build --loss-on
assistant`` only the positions before an assistant token of a chat row train; the others keep their
stored rows, which the reader marks untrained. Caches written before it have no such array: every
target trains.

and then the arrays of its target mode (``sample:N``, ``topk:K``, ``full``: see each codec). An
array's :class:`ArraySpec` says what its rows are (``per``), which is all the reader needs to find the
rows of a range of sequences (:func:`range_rows`).

Version 2 ends every inner chunk with a crc32c checksum of its compressed bytes (zarr v3's ``crc32c``
codec after the compressor, inside the sharding codec), so every read, of a whole array or of a few
rows, checks what it decodes. Version 1 (selkd before the checksum) has the same arrays without it:
only the whole-array sha256 of the commit records covers its chunks. Both are read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

FORMAT_NAME = "selkd-cache"
FORMAT_VERSION = 2  # what this selkd writes
READ_VERSIONS = (1, 2)  # what it reads
CHUNK_CHECKSUM_CODEC = "crc32c"  # the last codec of every inner chunk from version 2 on

ROOT_ATTR = "selkd"  # root group attribute holding the build header
SUMMARY_ATTR = "selkd_summary"  # root group attribute written at finalize
PARTS_GROUP = "parts"
SCORES_GROUP = "scores"
META_PREFIX = "selkd"  # JSON records that are not zarr nodes live under this key prefix
PLAN_KEY = f"{META_PREFIX}/plan.json"
COMMITS_PREFIX = f"{META_PREFIX}/commits"
SCORE_COMMITS_PREFIX = f"{META_PREFIX}/score-commits"
LEASES_PREFIX = f"{META_PREFIX}/leases"

# Inner chunks are the unit of reading (random access reads whole inner chunks); shards are the
# unit of writing (one shard per array per part, so a part is a handful of objects).
CHUNK_BYTES = 1 << 18


@dataclass(frozen=True)
class ArraySpec:
    """One stored array. ``per`` says what its rows are: ``seq`` (one per sequence), ``seq+1`` (offsets:
    S + 1 rows, the first 0), ``token``, ``target`` (target position) or ``entry`` (rows delimited per
    sequence by the part's other ``seq+1`` array, e.g. sample mode's ``class_offsets``). ``width``: the
    second dimension, None (none), ``k`` (the mode's K) or ``vocab`` (the number of classes C,
    the header's ``num_classes``)."""

    name: str
    dtype: str
    per: str
    width: str | None = None
    optional: bool = False  # parts written before the array existed lack it (see the reader)


COMMON_ARRAYS: tuple[ArraySpec, ...] = (
    ArraySpec("seq_index", "int64", "seq"),
    ArraySpec("seq_offsets", "int64", "seq+1"),
    ArraySpec("input_ids", "int32", "token"),
    ArraySpec("doc_start", "bool", "token"),
    ArraySpec("loss_mask", "bool", "token", optional=True),
    ArraySpec("teacher_entropy", "float16", "target"),
    ArraySpec("teacher_logprob", "float16", "target"),
)


def trained_targets(loss_mask: np.ndarray) -> np.ndarray:
    """bool [L - 1] of a sequence's L - 1 targets from its loss mask (bool [L], per token): the target at
    position t predicts token t + 1, so it trains iff token t + 1 is trained."""
    return loss_mask[1:]


def chunk_checksums(version: int) -> bool:
    """Whether every inner chunk of a cache of this format version ends with a crc32c checksum."""
    return version >= 2


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def score_part_name(index: int) -> str:
    return f"score-{index:05d}"


def chunk_rows(row_bytes: int, n_rows: int) -> int:
    """Rows per inner chunk: about CHUNK_BYTES uncompressed, at least 1, at most n_rows."""
    return max(1, min(max(n_rows, 1), CHUNK_BYTES // max(row_bytes, 1)))


def range_rows(
    specs: tuple[ArraySpec, ...], heads: Mapping[str, np.ndarray], start: int, stop: int
) -> dict[str, slice]:
    """The rows of every array but the offsets that sequences ``start .. stop - 1`` of a part occupy.

    ``heads``: rows ``start .. stop`` (inclusive) of every ``seq+1`` array of ``specs``, by name."""
    seq = heads["seq_offsets"]
    a, b = int(seq[0]), int(seq[-1])
    rows = {"seq": slice(start, stop), "token": slice(a, b), "target": slice(a - start, b - stop)}
    for name, offsets in heads.items():  # a mode has at most one entry offsets array (tests/test_codecs.py)
        if name != "seq_offsets":
            rows["entry"] = slice(int(offsets[0]), int(offsets[-1]))
    return {spec.name: rows[spec.per] for spec in specs if spec.per != "seq+1"}


# --- encodings ---------------------------------------------------------------------------------


def segment_starts(lengths: np.ndarray) -> np.ndarray:
    """Start offset of each segment of the given lengths."""
    starts = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], out=starts[1:])
    return starts


def delta_encode_segments(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Within each segment, keep the first value and replace the rest by their gaps."""
    out = values.astype(np.int64, copy=True)
    if len(out) > 1:
        out[1:] = values[1:].astype(np.int64) - values[:-1].astype(np.int64)
    starts = segment_starts(lengths)
    nonempty = lengths > 0
    out[starts[nonempty]] = values[starts[nonempty]]
    return out


def delta_decode_segments(deltas: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Inverse of :func:`delta_encode_segments` (vectorised: one cumsum and one repeat)."""
    cs = np.cumsum(deltas.astype(np.int64))
    starts = segment_starts(lengths)
    base = np.zeros(len(lengths), dtype=np.int64)
    has_prev = (starts > 0) & (lengths > 0)
    base[has_prev] = cs[starts[has_prev] - 1]
    return cs - np.repeat(base, lengths)


def pad_rows(values: np.ndarray, lengths: np.ndarray, fill: float | int, dtype: np.dtype | type) -> np.ndarray:
    """Flat entries grouped in rows of ``lengths`` -> [T, max(lengths)] padded with ``fill``."""
    width = int(lengths.max()) if len(lengths) else 0
    out = np.full((len(lengths), width), fill, dtype=dtype)
    if len(values):
        rows = np.repeat(np.arange(len(lengths)), lengths)
        cols = np.arange(len(values)) - np.repeat(segment_starts(lengths), lengths)
        out[rows, cols] = values
    return out

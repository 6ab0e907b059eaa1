"""The selkd cache format, version 2: names, dtypes, chunking, checksums and the target encodings.

This module is the single source of truth for the on-store layout (docs/cache-format.md describes
the same thing for people who read a cache with zarr alone). It is pure numpy: the writer encodes
with it, the reader and ``verify`` decode with it.

Per part ``parts/<name>/`` (a zarr group), with S sequences, P tokens and T = P - S target
positions (a sequence of L tokens has L - 1 next-token targets; target j of sequence i sits at
``seq_offsets[i] - i + j``):

=================  ============  =========  ===============================================
array              dtype         shape      meaning
=================  ============  =========  ===============================================
seq_index          int64         [S]        global sequence index in the packed corpus
seq_offsets        int64         [S+1]      token offsets of each sequence
input_ids          int32         [P]        the tokens
doc_start          bool          [P]        True at the first token of a document
teacher_entropy    float16       [T]        teacher entropy at T=1 (nats), full distribution
teacher_logprob    float16       [T]        teacher log-prob (T=1) of the actual next token
-- sample:N --
num_classes        uint8         [T]        unique ids kept at each position
class_offsets      int64         [S+1]      entry offsets of each sequence's first target
class_ids          int32         [E]        ids ascending within a position, delta-coded
class_counts       uint8         [E]        draw counts (sum to N per position)
-- topk:K --
class_ids          int32         [T, K]     ids in rank order (largest log-prob first)
class_logprobs     uint16        [T, K]     float16 bit patterns, delta-coded along K mod 2^16
tail_logmass       float16       [T]        log of the teacher mass outside the K ids
-- full --
class_logprobs     float16       [T, V]     every log-prob
=================  ============  =========  ===============================================

Both delta codings are lossless and exist only because they compress: sorted ids become small
gaps, and descending negative float16 values have increasing bit patterns.

Version 2 ends every inner chunk with a crc32c checksum of its compressed bytes (zarr v3's ``crc32c``
codec after the compressor, inside the sharding codec), so every read, of a whole array or of a few
rows, checks what it decodes. Version 1 (selkd before the checksum) has the same arrays without it:
only the whole-array sha256 of the commit records covers its chunks. Both are read.
"""

from __future__ import annotations

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
    name: str
    dtype: str
    per: str  # "seq", "seq+1", "token", "target", "entry"
    width: str | None = None  # None, "k" or "vocab": second dimension


COMMON_ARRAYS: tuple[ArraySpec, ...] = (
    ArraySpec("seq_index", "int64", "seq"),
    ArraySpec("seq_offsets", "int64", "seq+1"),
    ArraySpec("input_ids", "int32", "token"),
    ArraySpec("doc_start", "bool", "token"),
    ArraySpec("teacher_entropy", "float16", "target"),
    ArraySpec("teacher_logprob", "float16", "target"),
)
MODE_ARRAYS: dict[str, tuple[ArraySpec, ...]] = {
    "sample": (
        ArraySpec("num_classes", "uint8", "target"),
        ArraySpec("class_offsets", "int64", "seq+1"),
        ArraySpec("class_ids", "int32", "entry"),
        ArraySpec("class_counts", "uint8", "entry"),
    ),
    "topk": (
        ArraySpec("class_ids", "int32", "target", "k"),
        ArraySpec("class_logprobs", "uint16", "target", "k"),
        ArraySpec("tail_logmass", "float16", "target"),
    ),
    "full": (ArraySpec("class_logprobs", "float16", "target", "vocab"),),
}


def chunk_checksums(version: int) -> bool:
    """Whether every inner chunk of a cache of this format version ends with a crc32c checksum."""
    return version >= 2


def array_specs(mode: str) -> tuple[ArraySpec, ...]:
    return COMMON_ARRAYS + MODE_ARRAYS[mode]


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def score_part_name(index: int) -> str:
    return f"score-{index:05d}"


def chunk_rows(row_bytes: int, n_rows: int) -> int:
    """Rows per inner chunk: about CHUNK_BYTES uncompressed, at least 1, at most n_rows."""
    return max(1, min(max(n_rows, 1), CHUNK_BYTES // max(row_bytes, 1)))


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


def encode_f16_rows(logprobs: np.ndarray) -> np.ndarray:
    """[T, K] log-probs -> uint16 float16 bit patterns, delta-coded along K modulo 2^16."""
    bits = logprobs.astype(np.float16).view(np.uint16)
    out = bits.copy()
    out[:, 1:] = bits[:, 1:] - bits[:, :-1]  # uint16 arithmetic wraps: lossless
    return out


def decode_f16_rows(encoded: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_f16_rows`: [T, K] float16."""
    bits = np.cumsum(encoded, axis=1, dtype=np.uint16)
    return bits.view(np.float16)


def encode_sample(ids: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Padded [T, U] ids (ascending within a row) and counts (0 = padding) -> (num_classes [T] uint8,
    class_ids [E] int32 delta-coded, class_counts [E] uint8)."""
    keep = counts > 0
    num = keep.sum(axis=1).astype(np.uint8)
    flat_ids = ids[keep]
    flat_counts = counts[keep].astype(np.uint8)
    deltas = delta_encode_segments(flat_ids, num.astype(np.int64))
    return num, deltas.astype(np.int32), flat_counts


def decode_sample(num: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
    """Absolute ids [E] int64 from the stored delta-coded ids."""
    return delta_decode_segments(class_ids, num.astype(np.int64))


def pad_rows(values: np.ndarray, lengths: np.ndarray, fill: float | int, dtype: np.dtype | type) -> np.ndarray:
    """Flat entries grouped in rows of ``lengths`` -> [T, max(lengths)] padded with ``fill``."""
    width = int(lengths.max()) if len(lengths) else 0
    out = np.full((len(lengths), width), fill, dtype=dtype)
    if len(values):
        rows = np.repeat(np.arange(len(lengths)), lengths)
        cols = np.arange(len(values)) - np.repeat(segment_starts(lengths), lengths)
        out[rows, cols] = values
    return out

"""`selkd-cache verify`: check every committed part, vectorised, naming the part and array at fault.

Part names, split and array names of commit records and the plan are checked when the cache is
opened (:class:`~selkd.cache.reader.CacheReader` refuses names that are not ``part-NNNNN`` or an
array of the format, so nothing outside the store is ever opened); score-part records are checked
here the same way and reported as problems.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from selkd.cache import format as fmt
from selkd.cache.reader import (
    SCORE_DTYPES,
    SCORE_NAME,
    CacheCorruptError,
    CacheReader,
    PartRecord,
    check_array,
    read_failure,
)
from selkd.cache.writer import array_checksum

# float16 storage: log-probs carry up to ~0.008 nat of rounding each, so sums are checked loosely.
MASS_TOL = 0.02


@dataclass(frozen=True)
class Problem:
    part: str
    array: str
    message: str

    def __str__(self) -> str:
        return f"part {self.part}, array {self.array}: {self.message}"


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return (np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m).squeeze(axis)


def check_part(reader: CacheReader, rec: PartRecord) -> Iterator[Problem]:
    """Yield every problem of one part (none if it is intact)."""
    try:
        data = reader.read_part(rec, verify=True)
    except CacheCorruptError as err:
        yield Problem(err.part, err.array, err.problem)
        return
    a = data.arrays
    vocab, n_seq = reader.vocab_size, len(a["seq_index"])

    def bad(array: str, cond: Callable[[], bool], message: str) -> Iterator[Problem]:
        if cond():
            yield Problem(rec.name, array, message)

    off = a["seq_offsets"]
    yield from bad(
        "seq_offsets",
        lambda: len(off) != n_seq + 1 or off[0] != 0 or off[-1] != len(a["input_ids"]),
        "offsets do not span input_ids",
    )
    lengths = np.diff(off)
    yield from bad(
        "seq_offsets",
        lambda: bool((lengths < 2).any() or (lengths > reader.max_seq_len).any()),
        f"offsets not increasing by 2..{reader.max_seq_len} tokens per sequence",
    )
    n_targets = len(a["input_ids"]) - n_seq
    yield from bad(
        "input_ids",
        lambda: bool(((a["input_ids"] < 0) | (a["input_ids"] >= vocab)).any()),
        f"token ids outside [0, {vocab})",
    )
    for name in ("teacher_entropy", "teacher_logprob"):
        yield from bad(name, lambda name=name: len(a[name]) != n_targets, f"length != {n_targets} target positions")
    ent = a["teacher_entropy"].astype(np.float32)
    yield from bad(
        "teacher_entropy",
        lambda: bool((~np.isfinite(ent)).any() or (ent < -1e-2).any()),
        "negative or non-finite entropy",
    )
    lp = a["teacher_logprob"].astype(np.float32)
    yield from bad("teacher_logprob", lambda: bool((lp > 0).any() or np.isnan(lp).any()), "log-probs > 0 or NaN")

    if reader.mode == "sample":
        num = a["num_classes"].astype(np.int64)
        counts = a["class_counts"].astype(np.int64)
        co = a["class_offsets"]
        yield from bad(
            "num_classes",
            lambda: len(num) != n_targets or bool((num < 1).any()),
            "every target position needs >= 1 class",
        )
        yield from bad(
            "class_offsets",
            lambda: bool(co[0] != 0 or co[-1] != len(counts) or (np.diff(co) < 0).any()),
            "offsets not monotonic or not spanning class_ids",
        )
        yield from bad("class_counts", lambda: int(num.sum()) != len(counts), "entries != sum(num_classes)")
        if int(num.sum()) == len(counts) and len(num) and (num >= 1).all():
            sums = np.add.reduceat(counts, fmt.segment_starts(num))
            yield from bad(
                "class_counts",
                lambda: bool((sums != reader.k).any() or (counts < 1).any()),
                f"counts do not sum to N={reader.k} at every position",
            )
            ids = data.abs_ids
            yield from bad("class_ids", lambda: bool(((ids < 0) | (ids >= vocab)).any()), f"ids outside [0, {vocab})")
            gaps = a["class_ids"].astype(np.int64)
            not_first = np.ones(len(gaps), dtype=bool)
            not_first[fmt.segment_starts(num)] = False
            yield from bad(
                "class_ids",
                lambda: bool((gaps[not_first] <= 0).any()),
                "ids not strictly ascending within a position",
            )
    elif reader.mode == "topk":
        ids = a["class_ids"]
        yield from bad("class_ids", lambda: bool(((ids < 0) | (ids >= vocab)).any()), f"ids outside [0, {vocab})")
        kept = data.topk_logprobs.astype(np.float32)
        yield from bad("class_logprobs", lambda: bool((kept > 0).any() or np.isnan(kept).any()), "log-probs > 0 or NaN")
        tail = a["tail_logmass"].astype(np.float32)
        total = np.logaddexp(_logsumexp(kept), tail) if len(tail) else tail
        yield from bad(
            "tail_logmass",
            lambda: bool((np.abs(total) > MASS_TOL).any()),
            f"kept mass + tail mass differs from 1 by more than {MASS_TOL} nat",
        )
    else:
        full = a["class_logprobs"].astype(np.float32)
        yield from bad("class_logprobs", lambda: full.shape[1:] != (vocab,), f"width != vocab {vocab}")
        yield from bad("class_logprobs", lambda: bool((full > 0).any() or np.isnan(full).any()), "log-probs > 0 or NaN")
        yield from bad(
            "class_logprobs",
            lambda: bool(len(full) and (np.abs(_logsumexp(full)) > MASS_TOL).any()),
            "probabilities do not sum to 1",
        )


SCORE_ARRAYS = tuple(SCORE_DTYPES)


def check_scores(reader: CacheReader) -> Iterator[Problem]:
    """Every committed score part: a well-formed record whose arrays match their checksums."""
    storage = reader.storage
    for name in storage.list_dir(fmt.SCORE_COMMITS_PREFIX):
        stem = name.removesuffix(".json")
        record = "(score commit record)"
        if not name.endswith(".json") or not SCORE_NAME.fullmatch(stem):
            yield Problem(repr(stem), record, "invalid score-part name (expected score-NNNNN); not read")
            continue
        try:
            rec = storage.read_json(f"{fmt.SCORE_COMMITS_PREFIX}/{name}")
        except Exception as err:
            yield Problem(stem, record, f"unreadable ({type(err).__name__})")
            continue
        arrays = rec.get("arrays") if isinstance(rec, dict) else None
        if not isinstance(rec, dict) or rec.get("part") != stem or not isinstance(arrays, dict):
            yield Problem(stem, record, "does not name this score part or has no table of arrays; not read")
            continue
        unknown = [a for a in arrays if a not in SCORE_ARRAYS]
        if unknown or not all(isinstance(m, dict) and "sha256" in m for m in arrays.values()):
            yield Problem(stem, record, f"unknown arrays {unknown!r} or missing checksums; not read")
            continue
        part = stem
        for array, meta in arrays.items():
            try:
                opened = storage.open_array(f"{fmt.SCORES_GROUP}/{part}/{array}")
                check_array(reader.url, part, array, opened, SCORE_DTYPES[array], reader.chunk_checksums)
                values = opened[:]
            except CacheCorruptError as err:
                yield Problem(part, array, err.problem)
                continue
            except Exception as err:
                yield Problem(part, array, read_failure(reader.url, part, array, err).problem)
                continue
            if array_checksum(values) != meta["sha256"]:
                yield Problem(part, array, "checksum mismatch")


def verify_cache(reader: CacheReader, progress: Callable[[str], None] | None = None) -> list[Problem]:
    problems: list[Problem] = []
    for rec in reader.parts:
        if progress:
            progress(rec.name)
        problems.extend(check_part(reader, rec))
    problems.extend(check_scores(reader))
    return problems

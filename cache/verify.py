"""`selkd-cache verify`: check every committed part, vectorised, naming the part and array at fault.

Part names, split and array names of commit records and the plan are checked when the cache is
opened (:class:`~selkd.cache.reader.CacheReader` refuses names that are not ``part-NNNNN`` or an
array of the format, so nothing outside the store is ever opened); score-part records are checked
here the same way and reported as problems.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from itertools import chain

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


@dataclass(frozen=True)
class Problem:
    part: str
    array: str
    message: str

    def __str__(self) -> str:
        return f"part {self.part}, array {self.array}: {self.message}"


def check_part(reader: CacheReader, rec: PartRecord) -> Iterator[Problem]:
    """Yield every problem of one part (none if it is intact): the arrays every part has, then the mode's
    (its codec's ``check``)."""
    try:
        data = reader.read_part(rec, verify=True)
    except CacheCorruptError as err:
        yield Problem(err.part, err.array, err.problem)
        return
    a = data.arrays
    n_targets = len(a["input_ids"]) - len(a["seq_index"])
    mode_problems = reader.codec.check(a, data.decoded, n_targets, reader.num_classes, reader.k)
    for array, message in chain(_common_problems(a, reader.num_classes, reader.max_seq_len), mode_problems):
        yield Problem(rec.name, array, message)


def _common_problems(a: Mapping[str, np.ndarray], vocab: int, max_seq_len: int) -> Iterator[tuple[str, str]]:
    """(array, problem) for the arrays every part has."""
    n_seq = len(a["seq_index"])
    off = a["seq_offsets"]
    if len(off) != n_seq + 1 or off[0] != 0 or off[-1] != len(a["input_ids"]):
        yield "seq_offsets", "offsets do not span input_ids"
    lengths = np.diff(off)
    if (lengths < 2).any() or (lengths > max_seq_len).any():
        yield "seq_offsets", f"offsets not increasing by 2..{max_seq_len} tokens per sequence"
    n_targets = len(a["input_ids"]) - n_seq
    if "loss_mask" in a and len(a["loss_mask"]) != len(a["input_ids"]):
        yield "loss_mask", "length != the number of tokens (input_ids)"
    if ((a["input_ids"] < 0) | (a["input_ids"] >= vocab)).any():
        yield "input_ids", f"token ids outside [0, {vocab})"
    for name in ("teacher_entropy", "teacher_logprob"):
        if len(a[name]) != n_targets:
            yield name, f"length != {n_targets} target positions"
    ent = a["teacher_entropy"].astype(np.float32)
    if (~np.isfinite(ent)).any() or (ent < -1e-2).any():
        yield "teacher_entropy", "negative or non-finite entropy"
    lp = a["teacher_logprob"].astype(np.float32)
    if (lp > 0).any() or np.isnan(lp).any():
        yield "teacher_logprob", "log-probs > 0 or NaN"


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

"""CacheReader: the trainer's only way into a cache.

It reads the build header and the commit records, sees only committed parts, decodes a part's
arrays in one read (verifying their checksums) with the target mode's codec
(:mod:`selkd.cache.codecs`), and reads any run of a part's sequences by slicing (zarr then reads only
the inner chunks that hold it): :meth:`CacheReader.read_range` is what training streams,
:meth:`CacheReader.get` one sequence. All reading of part arrays goes through
:meth:`CacheReader.read_slices`.

Nothing in a cache's metadata is executed or followed outside the store: names that become store
keys (part names in commit records and in the plan, array names, score-part names) must match the
format's patterns (``part-NNNNN``, ``score-NNNNN``, the format's array names), or the cache is
refused with a :class:`CacheError` naming the record. Before any chunk is decoded, an array's zarr
metadata must use only the format's codecs (:data:`SAFE_CODECS`: no pickle or other code-bearing
codec, whatever zarr or numcodecs version is installed) and its dtype (:func:`check_array`).

Format version 2 ends every inner chunk with a crc32c of its compressed bytes, so every read, of a
whole array or of a few rows, checks the bytes it decodes; a v2 array without it is refused. A
chunk that fails its checksum or does not decode raises :class:`CacheCorruptError` naming the part
and the array (:func:`read_failure`). Version 1 caches have no per-chunk checksum: only whole-array
reads (``read_part``, ``iter_sequences``, ``verify``) check them, against the commit records' sha256.

A part whose commit record exists but whose arrays are gone altogether (``parts/<name>/`` deleted)
counts as missing, like an uncommitted one.
"""

from __future__ import annotations

import asyncio
import bisect
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
from zarr.api import asynchronous as zarr_async
from zarr.core.array import AsyncArray
from zarr.core.sync import sync

from selkd.cache import format as fmt
from selkd.cache.codecs import CODECS, TargetCodec
from selkd.cache.errors import SelkdError
from selkd.cache.scoring import committed_score_parts, sort_scores
from selkd.cache.store import Storage, StoreError
from selkd.cache.writer import array_checksum

if TYPE_CHECKING:  # the codecs make them; info and verify read arrays without torch
    from selkd.cache.targets import SparseTargets

PART_NAME = re.compile(r"^part-\d{5}$")
SCORE_NAME = re.compile(r"^score-\d{5}$")
SPLITS = ("train", "eval")
# Codecs a selkd cache may use (zarr v3 core codecs). Anything else (e.g. a pickle codec some numcodecs
# versions register) is refused before a chunk is decoded.
SAFE_CODECS = frozenset({"sharding_indexed", "bytes", "blosc", "zstd", "gzip", "crc32c", "transpose"})
SCORE_DTYPES = {"seq_index": "int64", "score": "float32"}
# What zarr's crc32c codec says when a chunk's (or a shard index's) stored checksum does not match.
CRC_MISMATCH = "checksum do not match"


class CacheError(SelkdError):
    """The cache cannot be used as asked: the message names the store and what to do."""


def _bad_metadata(url: str, where: str, problem: str) -> CacheError:
    return CacheError(
        f"{url}: {where}: {problem}; the cache metadata is damaged or was not written by selkd, so this cache "
        "is refused (nothing named in it is opened); rebuild it or restore the record from a good copy"
    )


def check_part_name(url: str, where: str, name: Any, pattern: re.Pattern[str] = PART_NAME) -> str:
    """``name`` if it is a valid part (or score-part) name, else a :class:`CacheError` naming ``where``:
    names become store keys, so anything like ``../../etc`` must never reach the store."""
    if not isinstance(name, str) or not pattern.fullmatch(name):
        expected = "part-NNNNN" if pattern is PART_NAME else "score-NNNNN"
        raise _bad_metadata(url, where, f"invalid part name {name!r} (expected {expected}, five digits)")
    return name


class CacheCorruptError(CacheError):
    """Stored data does not match its commit record; names the part and the array."""

    def __init__(self, store: str, part: str, array: str, problem: str) -> None:
        super().__init__(
            f"{store}: part {part}, array {array}: {problem}; rebuild this part "
            f"(delete {fmt.COMMITS_PREFIX}/{part}.json and rerun the build command)"
        )
        self.store, self.part, self.array, self.problem = store, part, array, problem

    def __reduce__(self) -> tuple[type, tuple[str, str, str, str]]:
        """Pickled with its four fields (it crosses from DataLoader worker processes)."""
        return (type(self), (self.store, self.part, self.array, self.problem))


@dataclass(frozen=True)
class CachedSequence:
    """One stored sequence of L tokens and the teacher's targets at its L - 1 positions."""

    seq_index: int
    input_ids: np.ndarray  # int32 [L]
    doc_start: np.ndarray  # bool [L]
    teacher_entropy: np.ndarray  # float32 [L - 1]
    teacher_logprob: np.ndarray  # float32 [L - 1]
    targets: SparseTargets  # leading shape [L - 1]
    trained: np.ndarray | None = None  # bool [L - 1]: which targets train (format.trained_targets); None: all

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class PartRecord:
    name: str
    split: str
    n_sequences: int
    n_tokens: int
    record: dict[str, Any]


def _codec_name(codec: Any) -> str:
    return str(codec.to_dict().get("name")) if hasattr(codec, "to_dict") else type(codec).__name__


def _codec_names(codecs: Any) -> Iterator[str]:
    for codec in codecs or ():
        name = _codec_name(codec)
        yield name
        if name == "sharding_indexed":
            yield from _codec_names(getattr(codec, "codecs", ()))
            yield from _codec_names(getattr(codec, "index_codecs", ()))


def _chunk_codec_names(codecs: Any) -> list[str]:
    """The codecs of an inner chunk: those inside the sharding codec, or the array's own."""
    codecs = list(codecs or ())
    if codecs and _codec_name(codecs[0]) == "sharding_indexed":
        codecs = list(getattr(codecs[0], "codecs", ()))
    return [_codec_name(c) for c in codecs]


def check_array(url: str, part: str, name: str, array: Any, dtype: str | None, chunk_checksums: bool) -> None:
    """Refuse (:class:`CacheCorruptError`) an opened zarr array (``Array`` or ``AsyncArray``) whose
    metadata is not what the format writes: zarr v3, codecs within :data:`SAFE_CODECS`, ``dtype``, and
    with ``chunk_checksums`` (format version 2) a crc32c as the last codec of every inner chunk.
    Opening reads only the metadata; this runs before any chunk is decoded."""
    meta = array.metadata
    if getattr(meta, "zarr_format", None) != 3:
        raise CacheCorruptError(url, part, name, "not a zarr v3 array; refused")
    unknown = sorted(set(_codec_names(meta.codecs)) - SAFE_CODECS)
    if unknown:
        raise CacheCorruptError(
            url, part, name, f"uses codec(s) {', '.join(unknown)}, which the selkd format never writes; refused"
        )
    if dtype is not None and np.dtype(array.dtype) != np.dtype(dtype):
        raise CacheCorruptError(url, part, name, f"dtype {array.dtype}, the format stores {dtype}; refused")
    if chunk_checksums and _chunk_codec_names(meta.codecs)[-1:] != [fmt.CHUNK_CHECKSUM_CODEC]:
        raise CacheCorruptError(
            url, part, name, "its chunks carry no crc32c, which format version 2 writes for every array; refused"
        )


def read_failure(url: str, part: str, name: str, err: Exception) -> CacheCorruptError:
    """The error for a read of an array that failed: a chunk (or the shard index) whose crc32c does not
    match its bytes, or that does not decode, or a store error."""
    if isinstance(err, ValueError) and CRC_MISMATCH in str(err):
        problem = "checksum mismatch in a stored chunk (crc32c): its bytes changed after they were written"
    else:
        problem = f"cannot be read ({type(err).__name__}: {err})"
    return CacheCorruptError(url, part, name, problem)


async def _gather(*aws: Awaitable[Any]) -> list[Any]:
    return list(await asyncio.gather(*aws))


def each_array(url: str, part: str, names: Iterable[str], call: Callable[[str], Awaitable[Any]]) -> dict[str, Any]:
    """``call(name)`` for every named array of a part, run concurrently in zarr's event loop (one trip
    for all of them). If any fails, they are retried one at a time to find the array at fault, and
    :func:`read_failure` names it."""
    names = list(names)
    try:
        values = sync(_gather(*(call(name) for name in names)))
    except Exception:
        for name in names:
            try:
                sync(call(name))
            except Exception as err:
                raise read_failure(url, part, name, err) from err
        raise
    return dict(zip(names, values))


def read_header(storage: Storage) -> dict[str, Any]:
    """The build header in the root group's attributes; refuses anything that is not a selkd cache of a
    format version this selkd reads (:data:`format.READ_VERSIONS`)."""
    root = storage.read_json("zarr.json")
    if root is None:
        raise CacheError(f"{storage.url}: not a selkd cache (no zarr.json); build one with `selkd-cache build`")
    header = root.get("attributes", {}).get(fmt.ROOT_ATTR)
    if not isinstance(header, dict) or header.get("format") != fmt.FORMAT_NAME:
        raise CacheError(f"{storage.url}: a zarr store, but not a selkd cache (no '{fmt.ROOT_ATTR}' attribute)")
    version = header.get("format_version")
    if version not in fmt.READ_VERSIONS:
        readable = " and ".join(str(v) for v in fmt.READ_VERSIONS)
        raise CacheError(
            f"{storage.url}: cache format version {version}, but this selkd reads versions {readable}; "
            "rebuild the cache with this selkd or install the selkd that wrote it"
        )
    return header


def header_classes(header: Mapping[str, Any]) -> int:
    """C, the number of classes a cache's targets cover (ids < C, full targets C wide): the header's
    ``num_classes`` (the tokenizer's length), or, in caches written before it was recorded (format v1
    and early v2), ``vocab_size``, the teacher's head, which was then the class width."""
    return int(header.get("num_classes", header["vocab_size"]))


class CacheReader:
    def __init__(self, storage: Storage, require_complete: bool = True) -> None:
        self.storage = storage
        self.url = storage.url
        self.header = read_header(storage)
        self.format_version: int = int(self.header["format_version"])
        self.chunk_checksums: bool = fmt.chunk_checksums(self.format_version)  # crc32c on every chunk read
        root = storage.read_json("zarr.json") or {}
        self.summary: dict[str, Any] | None = root.get("attributes", {}).get(fmt.SUMMARY_ATTR)
        self.plan: dict[str, Any] | None = storage.read_json(fmt.PLAN_KEY)
        classes = self.header["classes"]
        self.mode: str = classes["mode"]
        self.k: int = int(classes["k"])
        codec = CODECS.get(self.mode)
        if codec is None:
            raise _bad_metadata(
                self.url,
                "the build header",
                f"unknown target mode {self.mode!r} (this selkd reads {', '.join(CODECS)})",
            )
        self.codec: TargetCodec = codec  # the mode's arrays, how they decode, what verify checks
        self.vocab_size: int = int(self.header["vocab_size"])  # the teacher's head rows
        self.num_classes: int = header_classes(self.header)  # what target ids index
        self.max_seq_len: int = int(self.header["max_seq_len"])
        self.temperature: float = float(self.header["temperature"])
        self.tokenizer_fingerprint: str = self.header["tokenizer_fingerprint"]
        # which positions train (``selkd-cache build --loss-on``); caches from before it train every one
        self.loss_on: str = self.header.get("settings", {}).get("loss_on", "all")
        self._check_plan()
        committed = self._committed_parts()
        # One listing: a part whose arrays were deleted altogether is missing, not a read error later.
        present = set(self.storage.list_dir(fmt.PARTS_GROUP))
        self.lost_parts: list[str] = [p.name for p in committed if p.name not in present]
        self.parts: list[PartRecord] = [p for p in committed if p.name in present]
        self._dtypes = {spec.name: spec.dtype for spec in codec.specs}
        if require_complete and self.plan is None:
            raise CacheError(
                f"{self.url}: incomplete cache: the build stopped before it wrote its part plan "
                f"({fmt.PLAN_KEY}); rerun the same `selkd-cache build` command to finish it"
            )
        if require_complete and self.missing_parts:
            shown = ", ".join(self.missing_parts[:5]) + (" ..." if len(self.missing_parts) > 5 else "")
            lost = (
                f"; {len(self.lost_parts)} of them have a commit record but their arrays are gone"
                if self.lost_parts
                else ""
            )
            raise CacheError(
                f"{self.url}: incomplete cache: {len(self.missing_parts)} of {self.expected_parts} parts are not "
                f"committed ({shown}){lost}; rerun the same `selkd-cache build` command to finish it"
                + (f" (first delete {fmt.COMMITS_PREFIX}/<part>.json of those)" if self.lost_parts else "")
            )
        self._by_split: dict[str, list[PartRecord]] = {}
        for p in self.parts:
            self._by_split.setdefault(p.split, []).append(p)

    def _check_plan(self) -> None:
        """The plan's part names and splits (they name store keys and the parts a cache must have)."""
        if self.plan is None:
            return
        where = fmt.PLAN_KEY
        parts = self.plan.get("parts") if isinstance(self.plan, dict) else None
        if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
            raise _bad_metadata(self.url, where, "no list of parts")
        for p in parts:
            check_part_name(self.url, where, p.get("name"))
            if p.get("split") not in SPLITS:
                raise _bad_metadata(self.url, where, f"part {p.get('name')}: invalid split {p.get('split')!r}")

    def _committed_parts(self) -> list[PartRecord]:
        out = []
        arrays_allowed = {spec.name for spec in self.codec.specs}
        for name in self.storage.list_dir(fmt.COMMITS_PREFIX):
            where = f"{fmt.COMMITS_PREFIX}/{name}"
            if not name.endswith(".json"):
                continue
            check_part_name(self.url, where, name.removesuffix(".json"))
            rec = self.storage.read_json(where)
            if not isinstance(rec, dict) or "part" not in rec:
                raise CacheCorruptError(self.url, name.removesuffix(".json"), "(commit record)", "unreadable record")
            part = check_part_name(self.url, where, rec["part"])
            if part != name.removesuffix(".json"):
                raise _bad_metadata(self.url, where, f"names part {part!r}, not the part of its file name")
            if rec.get("split") not in SPLITS:
                raise _bad_metadata(self.url, where, f"invalid split {rec.get('split')!r}")
            arrays = rec.get("arrays")
            if not isinstance(arrays, dict) or not all(isinstance(m, dict) for m in arrays.values()):
                raise _bad_metadata(self.url, where, "no table of arrays")
            unknown = sorted(str(a) for a in arrays if a not in arrays_allowed)
            if unknown:
                raise _bad_metadata(self.url, where, f"unknown array name(s) {', '.join(repr(a) for a in unknown[:3])}")
            try:
                n_seq, n_tok = int(rec["n_sequences"]), int(rec["n_tokens"])
            except (KeyError, TypeError, ValueError):
                raise _bad_metadata(self.url, where, "no valid n_sequences / n_tokens") from None
            out.append(PartRecord(part, rec["split"], n_seq, n_tok, rec))
        return sorted(out, key=lambda p: p.name)

    # --- what is there -------------------------------------------------------------------------
    @property
    def expected_parts(self) -> int:
        return len(self.plan["parts"]) if self.plan else len(self.parts)

    @cached_property
    def missing_parts(self) -> list[str]:
        """Planned parts that cannot be read: not committed, or committed but their arrays are gone."""
        if not self.plan:
            return list(self.lost_parts)
        have = {p.name for p in self.parts}
        return [p["name"] for p in self.plan["parts"] if p["name"] not in have]

    def split_parts(self, split: str = "train") -> list[PartRecord]:
        return list(self._by_split.get(split, []))

    def num_sequences(self, split: str = "train") -> int:
        return sum(p.n_sequences for p in self.split_parts(split))

    def scores(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(seq_index int64 [n], score float32 [n]) of every scored training sequence, or None when
        the build did no sample selection."""
        idx, val = [], []
        for name in sorted(committed_score_parts(self.storage)):
            check_part_name(self.url, f"{fmt.SCORE_COMMITS_PREFIX}/{name}.json", name, SCORE_NAME)
            opened = self._open(name, f"{fmt.SCORES_GROUP}/{name}", SCORE_DTYPES)
            values = self._read(name, opened, {array: slice(None) for array in SCORE_DTYPES})
            idx.append(values["seq_index"])
            val.append(values["score"])
        seq_index, scores = sort_scores(idx, val)
        return (seq_index, scores) if len(seq_index) else None

    # --- reading -------------------------------------------------------------------------------
    def open_part(self, part: PartRecord, names: Iterable[str] | None = None) -> dict[str, AsyncArray]:
        """Arrays of a committed part (default: all of them), opened concurrently (metadata only) and
        checked by :func:`check_array` before any chunk is decoded. Keep them to save re-reading the
        metadata on every :meth:`read_slices`."""
        dtypes = {name: self._dtypes.get(name) for name in (part.record["arrays"] if names is None else names)}
        return self._open(part.name, f"{fmt.PARTS_GROUP}/{part.name}", dtypes)

    def read_slices(
        self, part: PartRecord, slices: Mapping[str, slice], arrays: Mapping[str, AsyncArray] | None = None
    ) -> dict[str, np.ndarray]:
        """Rows ``slices[name]`` of each named array of a part, read concurrently (one trip through
        zarr's event loop). Every inner chunk read is checked against its crc32c (format version 2); a
        chunk that fails it or does not decode raises :class:`CacheCorruptError` naming the part and
        the array. ``arrays``: the part's arrays from :meth:`open_part` (opened here if None)."""
        return self._read(part.name, self.open_part(part, slices) if arrays is None else arrays, slices)

    def _open(self, part: str, group: str, dtypes: Mapping[str, str | None]) -> dict[str, AsyncArray]:
        """Arrays ``group/<name>`` of a part (or score part), opened concurrently, checked."""
        store = self.storage.store
        opened = each_array(
            self.url, part, dtypes, lambda name: zarr_async.open_array(store=store, path=f"{group}/{name}", mode="r")
        )
        for name, array in opened.items():
            check_array(self.url, part, name, array, dtypes[name], self.chunk_checksums)
        return opened

    def _read(self, part: str, arrays: Mapping[str, AsyncArray], slices: Mapping[str, slice]) -> dict[str, np.ndarray]:
        values = each_array(self.url, part, slices, lambda name: arrays[name].getitem(slices[name]))
        return {name: np.asarray(v) for name, v in values.items()}

    def read_range(
        self, part: PartRecord, start: int, stop: int, arrays: Mapping[str, AsyncArray] | None = None
    ) -> PartData:
        """Sequences ``start .. stop - 1`` of a committed part as a :class:`PartData` (positions
        ``0 .. stop - start - 1``): one slice per array, read concurrently by :meth:`read_slices`, the
        offset arrays rebased to the range. The whole-array sha256 is not verified here (``read_part``
        does); the per-chunk crc32c of version 2 is."""
        if not 0 <= start < stop <= part.n_sequences:
            raise IndexError(f"{part.name}: range [{start}, {stop}) outside its {part.n_sequences} sequences")
        if arrays is None:
            arrays = self.open_part(part)
        specs = self.part_specs(part)
        heads = self.read_slices(part, {s.name: slice(start, stop + 1) for s in specs if s.per == "seq+1"}, arrays)
        out = {name: offsets.astype(np.int64) - int(offsets[0]) for name, offsets in heads.items()}
        out.update(self.read_slices(part, fmt.range_rows(specs, heads, start, stop), arrays))
        return PartData(self, part, out)

    def part_specs(self, part: PartRecord) -> tuple[fmt.ArraySpec, ...]:
        """The arrays a part has: the mode's, less the optional ones its commit record does not list
        (a part written before they existed)."""
        listed = part.record["arrays"]
        return tuple(s for s in self.codec.specs if not s.optional or s.name in listed)

    def read_part(self, part: str | PartRecord, verify: bool = True) -> PartData:
        """Every array of a committed part, checked against the commit record's shapes and (``verify``)
        sha256 checksums."""
        rec = part if isinstance(part, PartRecord) else self._record(part)
        arrays = self.read_slices(rec, {name: slice(None) for name in rec.record["arrays"]})
        for name, meta in rec.record["arrays"].items():
            values = arrays[name]
            if list(values.shape) != meta["shape"]:
                raise CacheCorruptError(self.url, rec.name, name, f"shape {values.shape} != committed {meta['shape']}")
            if verify and array_checksum(values) != meta["sha256"]:
                raise CacheCorruptError(self.url, rec.name, name, "checksum mismatch")
        return PartData(self, rec, arrays)

    def _record(self, name: str) -> PartRecord:
        for p in self.parts:
            if p.name == name:
                return p
        raise CacheError(f"{self.url}: no committed part named {name}")

    def iter_sequences(self, split: str = "train") -> Iterator[CachedSequence]:
        """Every sequence of a split, part by part (one read per part)."""
        for rec in self.split_parts(split):
            data = self.read_part(rec)
            for i in range(rec.n_sequences):
                yield data.sequence(i)

    def eval_sequences(self) -> Iterator[CachedSequence]:
        return self.iter_sequences("eval")

    @cached_property
    def _cum(self) -> dict[str, list[int]]:
        out = {}
        for split, parts in self._by_split.items():
            cum, total = [0], 0
            for p in parts:
                total += p.n_sequences
                cum.append(total)
            out[split] = cum
        return out

    def get(self, i: int, split: str = "train") -> CachedSequence:
        """Sequence i of a split (0-based over its committed parts), reading only its chunks
        (:meth:`read_range` of one sequence: checked as that is)."""
        parts = self.split_parts(split)
        cum = self._cum.get(split, [0])
        if not 0 <= i < cum[-1]:
            raise IndexError(f"sequence {i} out of range: the {split} split has {cum[-1]} sequences")
        p = bisect.bisect_right(cum, i) - 1
        return self.read_range(parts[p], i - cum[p], i - cum[p] + 1).sequence(0)


class PartData:
    """A part's (or a range's) arrays, decoded once by the mode's codec (``decoded``, by array name);
    :meth:`sequence` slices one sequence out without further reads."""

    def __init__(self, reader: CacheReader, rec: PartRecord, arrays: Mapping[str, np.ndarray]) -> None:
        self.reader, self.rec, self.arrays = reader, rec, dict(arrays)
        self.offsets = self.arrays["seq_offsets"]
        self.decoded = reader.codec.decode(self.arrays)

    def __len__(self) -> int:
        return int(self.arrays["seq_index"].shape[0])

    def sequence(self, j: int) -> CachedSequence:
        a, b = int(self.offsets[j]), int(self.offsets[j + 1])
        ta, tb = a - j, b - j - 1
        arrays = self.arrays
        mask = arrays.get("loss_mask")
        return CachedSequence(
            seq_index=int(arrays["seq_index"][j]),
            input_ids=arrays["input_ids"][a:b],
            doc_start=arrays["doc_start"][a:b],
            teacher_entropy=arrays["teacher_entropy"][ta:tb].astype(np.float32),
            teacher_logprob=arrays["teacher_logprob"][ta:tb].astype(np.float32),
            targets=self.reader.codec.targets(arrays, self.decoded, j, slice(ta, tb), self.reader.k),
            trained=None if mask is None else fmt.trained_targets(mask[a:b]),
        )


def open_cache(
    url: str, storage_options: Mapping[str, Any] | None = None, require_complete: bool = True
) -> CacheReader:
    """Open a cache for reading: a local path or an fsspec URL (s3://bucket/prefix)."""
    try:
        storage = Storage.open(url, storage_options, mode="r")
    except StoreError as err:
        raise CacheError(str(err)) from err
    return CacheReader(storage, require_complete=require_complete)

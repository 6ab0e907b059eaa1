"""The token store: the tokenized corpus in shards (layout, reading) and its packed view.

``selkd-cache prepare`` (:mod:`selkd.cache.prepare`) writes it; the cache build and online training
read it through :class:`PackedTokens`, which cuts the global token stream into ``max_seq_len``
sequences exactly as :class:`selkd.cache.corpus.PackedCorpus` does in memory, but reads only the shard
slices the requested sequences cover. docs/token-store.md describes the layout for people who read it
with zarr alone; this module is the single source of truth for names and records.

Layout (a zarr v3 group, local or behind an fsspec URL, through :class:`~selkd.cache.store.Storage`):

- ``zarr.json``: the root group; attribute ``selkd_tokens`` holds the header (tokenizer, data specs,
  text field, token limit): what the store is, fixed when it is created.
- ``selkd/units.json``: the sources found and the units of work (see :mod:`selkd.cache.units`).
- ``shards/u<unit>-<j>/tokens`` (int32 [n]), ``.../doc_start`` (bool [n], True at a document's
  first token) and ``.../loss_mask`` (bool [n], True at a trained token: see
  :mod:`selkd.cache.tokenizing`; a shard without it, written before it existed, reads as all True):
  the j-th shard of a unit's tokens, each document followed by EOS. Written whole, once,
  like a cache part's arrays (one zarr shard object of 256 KiB crc32c-checked inner chunks).
- ``selkd/unit-commits/unit-<i>.json``: the unit is done; its shards, token and document counts, the
  sha256 of its stream, its data-problem counters. Absent: the unit is redone on a rerun.
- ``selkd/summary.json``: written once every unit the corpus needs is committed: the shards in stream
  order with the tokens each contributes, the totals and the content hash. Readers need it.

The global stream is the shards in unit order, cut at the token limit. Its identity, the *content hash*,
is the sha256 of the per-unit stream hashes (:class:`~selkd.cache.tokenizing.StreamHash`, which do not
depend on how a unit was cut into shards or how many workers wrote it); the packed view's fingerprint
adds ``max_seq_len``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from selkd.cache.documents import CorpusStats
from selkd.cache.errors import SelkdError
from selkd.cache.store import Storage, StoreError, is_url
from selkd.cache.tokenizing import StreamHash

TOKENS_FORMAT = "selkd-tokens"
TOKENS_VERSION = 1
ROOT_ATTR = "selkd_tokens"
UNITS_KEY = "selkd/units.json"
UNIT_COMMITS_PREFIX = "selkd/unit-commits"
SUMMARY_KEY = "selkd/summary.json"
SHARDS_GROUP = "shards"
#: The per-token array of trained tokens (:mod:`selkd.cache.tokenizing`); optional, absent means all True.
LOSS_MASK = "loss_mask"
#: Where ``selkd-cache build --data`` prepares its token store inside the cache.
CACHE_TOKENS_PREFIX = "tokens"
#: Version of the corpus fingerprint a cache header records (``data.fingerprint_version``): 1 was the
#: sha256 of the whole packed stream (selkd before the token store), 2 the token store's.
FINGERPRINT_VERSION = 2


class TokenStoreError(SelkdError):
    """A user-facing token store problem: names the store and what to do."""


def store_options(location: str, options: dict[str, Any] | None) -> dict[str, Any] | None:
    """The storage options that apply to the store at ``location``: one ``--storage-option`` list serves
    both the data URLs and the stores, and a local store takes none."""
    return (options or None) if is_url(location) else None


def unit_name(unit: int) -> str:
    return f"unit-{unit:06d}"


def shard_name(unit: int, index: int) -> str:
    return f"u{unit:06d}-{index:04d}"


def unit_commit_key(unit: int) -> str:
    return f"{UNIT_COMMITS_PREFIX}/{unit_name(unit)}.json"


def shard_array(shard: str, array: str) -> str:
    return f"{SHARDS_GROUP}/{shard}/{array}"


def stats_record(stats: CorpusStats) -> dict[str, Any]:
    return dataclasses.asdict(stats)


def join_stats(records: Sequence[dict[str, Any]], text_field: str) -> CorpusStats:
    """The counters of several units' stats records summed, each "first at" taken from the first unit
    that has one (units are in stream order)."""
    out = CorpusStats(text_field=text_field)
    for record in records:
        for f in dataclasses.fields(CorpusStats):
            value = record.get(f.name)
            if f.name == "text_field" or value is None:
                continue
            current = getattr(out, f.name)
            if isinstance(value, int):
                setattr(out, f.name, current + value)
            elif current is None:
                setattr(out, f.name, value)
    return out


def content_hash(unit_hashes: Sequence[tuple[int, int, str]]) -> str:
    """The identity of the stream: (unit, tokens used, stream hash of those tokens) per unit, in order."""
    h = hashlib.sha256(f"{TOKENS_FORMAT}-v{TOKENS_VERSION}".encode())
    for unit, n, digest in unit_hashes:
        h.update(f"\n{unit}:{n}:{digest}".encode())
    return h.hexdigest()


def view_fingerprint(content: str, max_seq_len: int) -> str:
    """The identity of the packed sequences: the stream's content hash and ``max_seq_len``."""
    return hashlib.sha256(f"{content}:{int(max_seq_len)}".encode()).hexdigest()


class TokenStore:
    """A prepared token store, read-only: header, summary, and token ranges of the global stream.

    Holds O(number of shards) in memory: the shard names and their offsets in the stream."""

    def __init__(self, storage: Storage, header: dict[str, Any], summary: dict[str, Any]) -> None:
        self.storage, self.header, self.summary = storage, header, summary
        self.shards: list[str] = [name for name, _ in summary["shards"]]
        lengths = np.array([n for _, n in summary["shards"]], dtype=np.int64)
        self.offsets = np.zeros(len(lengths) + 1, dtype=np.int64)  # [n_shards + 1]
        np.cumsum(lengths, out=self.offsets[1:])
        self._arrays: dict[str, tuple[Any, Any]] = {}
        self._masks: dict[str, Any] = {}  # shard -> its loss_mask array, None where it has none

    @classmethod
    def open(cls, location: str, storage_options: dict[str, Any] | None = None) -> TokenStore:
        """Open a finished token store (TokenStoreError naming it if it is not one, or not finished)."""
        try:
            storage = Storage.open(location, store_options(location, storage_options), mode="r")
        except StoreError as err:
            raise TokenStoreError(f"{err}; prepare one with `selkd-cache prepare --out {location}`") from err
        return cls.from_storage(storage)

    @classmethod
    def from_storage(cls, storage: Storage) -> TokenStore:
        header = read_header(storage)
        if header is None:
            raise TokenStoreError(
                f"{storage.url}: not a selkd token store (no {ROOT_ATTR} header); prepare one with `selkd-cache "
                "prepare`"
            )
        summary = storage.read_json(SUMMARY_KEY)
        if summary is None:
            raise TokenStoreError(
                f"{storage.url}: the token store is not finished (no {SUMMARY_KEY}); rerun its `selkd-cache prepare` "
                "command to finish it"
            )
        return cls(storage, header, summary)

    @property
    def url(self) -> str:
        return self.storage.url

    @property
    def n_tokens(self) -> int:
        return int(self.summary["n_tokens"])

    @property
    def tokenizer_fingerprint(self) -> str:
        return str(self.header["tokenizer_fingerprint"])

    @property
    def stats(self) -> CorpusStats:
        return CorpusStats(**self.summary["stats"])

    def _shard_arrays(self, index: int) -> tuple[Any, Any]:
        name = self.shards[index]
        if name not in self._arrays:
            self._arrays[name] = (
                self.storage.open_array(shard_array(name, "tokens")),
                self.storage.open_array(shard_array(name, "doc_start")),
            )
        return self._arrays[name]

    def _mask_array(self, index: int) -> Any:
        name = self.shards[index]
        if name not in self._masks:
            path = shard_array(name, LOSS_MASK)
            self._masks[name] = self.storage.open_array(path) if self.storage.exists(f"{path}/zarr.json") else None
        return self._masks[name]

    def _pieces(self, start: int, end: int, read: Callable[[int, int, int], Any]) -> list[Any]:
        """``read(shard index, a, b)`` for the slice ``[a, b)`` of each shard that ``[start, end)`` covers."""
        if not 0 <= start <= end <= self.n_tokens:
            raise IndexError(f"token range [{start}, {end}) outside the stream of {self.n_tokens} tokens")
        out = []
        s = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while s < len(self.shards) and self.offsets[s] < end:
            base = int(self.offsets[s])
            out.append(read(s, max(start, base) - base, min(end, int(self.offsets[s + 1])) - base))
            s += 1
        return out

    def read(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens (int32 [end - start]) and document starts (bool [end - start]) of ``[start, end)``
        of the global stream, read from the one or few shards it covers."""
        pieces = self._pieces(start, end, lambda s, a, b: tuple(array[a:b] for array in self._shard_arrays(s)))
        if not pieces:
            return np.zeros(0, np.int32), np.zeros(0, np.bool_)
        tokens, starts = zip(*pieces, strict=True)
        return np.concatenate(tokens).astype(np.int32, copy=False), np.concatenate(starts).astype(np.bool_, copy=False)

    def read_mask(self, start: int, end: int) -> np.ndarray:
        """The loss mask (bool [end - start]) of ``[start, end)``: True at trained tokens."""

        def read(s: int, a: int, b: int) -> np.ndarray:
            array = self._mask_array(s)
            return np.ones(b - a, np.bool_) if array is None else np.asarray(array[a:b], dtype=np.bool_)

        pieces = self._pieces(start, end, read)
        return np.concatenate(pieces) if pieces else np.zeros(0, np.bool_)

    def packed(self, max_seq_len: int) -> PackedTokens:
        return PackedTokens(self, max_seq_len)

    def describe(self) -> str:
        """What ``selkd-cache info`` prints for a token store."""
        h, s = self.header, self.summary
        data = h["data"]
        rows = [
            ("format", f"{h['format']} v{h['format_version']}"),
            ("tokenizer", f"{h['tokenizer']} (fingerprint {h['tokenizer_fingerprint'][:16]}...)"),
            ("data", " ".join(data["specs"])),
            ("text field", data["text_field"]),
            ("limit tokens", "none" if data["limit_tokens"] is None else f"{data['limit_tokens']:,}"),
            ("tokens", f"{s['n_tokens']:,} in {len(s['shards'])} shards of {s['units_used']} units"),
            ("documents", f"{s['n_documents']:,}"),
            ("content hash", s["content_sha256"]),
        ]
        lines = [f"{k:<16}{v}" for k, v in rows]
        lines += [f"warning         {w}" for w in self.stats.warnings()]
        return "\n".join(lines)


def read_header(storage: Storage) -> dict[str, Any] | None:
    """The header of the token store in ``storage``, None if there is none (an empty or foreign store);
    TokenStoreError for a token store this selkd cannot read."""
    root = storage.read_json("zarr.json")
    header = None if not isinstance(root, dict) else root.get("attributes", {}).get(ROOT_ATTR)
    if header is None:
        return None
    if header.get("format") != TOKENS_FORMAT or header.get("format_version") != TOKENS_VERSION:
        raise TokenStoreError(
            f"{storage.url}: token store format {header.get('format')} v{header.get('format_version')} is not "
            f"{TOKENS_FORMAT} v{TOKENS_VERSION}; prepare it again with this selkd"
        )
    return header


def stream_hash_of(store: TokenStore, start: int, end: int, step: int = 1 << 24) -> StreamHash:
    """The :class:`StreamHash` of ``[start, end)`` of the stream, read ``step`` tokens at a time."""
    h = StreamHash()
    for a in range(start, end, step):
        tokens, doc_start = store.read(a, min(a + step, end))
        h.update(tokens, np.flatnonzero(doc_start))
    return h


class Packing:
    """A token stream cut into consecutive ``max_seq_len`` sequences: sequence ``i`` is tokens
    ``[i * L, (i + 1) * L)``; the last one may be shorter, but has at least 2 tokens so that it still
    yields one next-token target. Subclasses say where tokens come from (:meth:`_read_range`)."""

    max_seq_len: int
    fingerprint: str

    @property
    def n_tokens(self) -> int:
        raise NotImplementedError

    @property
    def max_token_id(self) -> int:
        """The largest token id of the stream (at least; for checking it against a vocabulary)."""
        raise NotImplementedError

    def _read_range(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int32, doc_start bool) of ``[start, end)`` of the stream."""
        raise NotImplementedError

    @property
    def n_sequences(self) -> int:
        full, rest = divmod(self.n_tokens, self.max_seq_len)
        return full + (1 if rest >= 2 else 0)

    def sequence_bounds(self, i: int) -> tuple[int, int]:
        """``[start, end)`` of sequence ``i`` in the stream (negative ``i`` counts from the end)."""
        n = self.n_sequences
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for a corpus of {n} sequences")
        if i < 0:
            i += n
        start = i * self.max_seq_len
        return start, min(start + self.max_seq_len, self.n_tokens)

    def _indices(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """int64 sequence indices; ``indices`` may also be a bool mask over all sequences."""
        idx = np.asarray(indices)
        if idx.dtype == np.bool_:
            if idx.shape != (self.n_sequences,):
                raise ValueError(f"bool mask of shape {idx.shape} does not match {self.n_sequences} sequences")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).ravel()
        n = self.n_sequences
        if idx.size and (idx.min() < -n or idx.max() >= n):
            bad = int(idx[(idx < -n) | (idx >= n)][0])
            raise IndexError(f"sequence {bad} out of range for a corpus of {n} sequences")
        return np.where(idx < 0, idx + n, idx)

    def _gather(
        self, indices: np.ndarray | Sequence[int], read_range: Callable[[int, int], tuple[np.ndarray, ...]]
    ) -> list[tuple[np.ndarray, ...]]:
        """``read_range(start, end)`` (a tuple of per-token arrays) cut into the sequences asked, in the
        order asked. Adjacent sequences are read as one range, so a batch of consecutive sequences is one
        read."""
        idx = self._indices(indices)
        starts = idx * self.max_seq_len
        ends = np.minimum(starts + self.max_seq_len, self.n_tokens)
        out: list[tuple[np.ndarray, ...]] = [()] * len(idx)
        order = np.argsort(starts, kind="stable")
        run: list[int] = []

        def flush() -> None:
            a, b = int(starts[run[0]]), int(ends[run[-1]])
            arrays = read_range(a, b)
            for j in run:
                out[j] = tuple(x[starts[j] - a : ends[j] - a] for x in arrays)

        for j in order:
            if run and starts[j] > ends[run[-1]]:  # a gap: read what came so far
                flush()
                run = []
            run.append(int(j))
        if run:
            flush()
        return out

    def read(self, indices: np.ndarray | Sequence[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Tokens (int32) and document starts (bool) of several sequences, in the order asked (see
        :meth:`_gather`)."""
        seqs = self._gather(indices, self._read_range)
        return [s[0] for s in seqs], [s[1] for s in seqs]

    def loss_masks(self, indices: np.ndarray | Sequence[int], loss_on: str) -> list[np.ndarray]:
        """The loss masks (bool [L], True at a trained token) of several sequences, in the order asked:
        the stored ones (see :mod:`selkd.cache.tokenizing`) for ``--loss-on assistant``, all True for
        ``all``."""
        if loss_on == "all":
            return [np.ones(b - a, np.bool_) for a, b in map(self.sequence_bounds, self._indices(indices))]
        return [s[0] for s in self._gather(indices, lambda a, b: (self._read_mask_range(a, b),))]

    def _read_mask_range(self, start: int, end: int) -> np.ndarray:
        """The loss mask (bool) of ``[start, end)`` of the stream."""
        raise NotImplementedError

    def sequences(self, indices: np.ndarray | Sequence[int]) -> list[np.ndarray]:
        """int32 tokens of several sequences (see :meth:`read`)."""
        return self.read(indices)[0]


class PackedTokens(Packing):
    """The packed view of a :class:`TokenStore`: reads the shard slices each request covers; holds
    nothing of the corpus in memory."""

    def __init__(self, store: TokenStore, max_seq_len: int) -> None:
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
        self.store, self.max_seq_len = store, int(max_seq_len)
        self.fingerprint = view_fingerprint(store.summary["content_sha256"], max_seq_len)
        self.stats = store.stats

    @property
    def n_tokens(self) -> int:
        return self.store.n_tokens

    @property
    def max_token_id(self) -> int:
        return int(self.store.summary["max_token"])

    def _read_range(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        return self.store.read(start, end)

    def _read_mask_range(self, start: int, end: int) -> np.ndarray:
        return self.store.read_mask(start, end)

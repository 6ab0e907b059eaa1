"""`selkd-cache prepare`: the corpus stage. Data specs -> units -> token shards -> a finished token store.

Every preparer (a torchrun rank, or ``--rank``/``--world-size``) resolves the same specs; rank 0 plans
the units (:mod:`selkd.cache.units`) and stores the plan; rank r tokenizes units r, r + W, ... in order,
alone or with ``--workers`` local processes, each unit by exactly one worker, written as whole shards
and committed by one atomic record (:mod:`selkd.cache.tokens` has the layout). Memory per worker is
one shard (``--shard-tokens``) plus one tokenizer batch, whose size is bounded too (but includes the
longest document whole), never the corpus. A rerun skips committed units; once
every unit the corpus needs is committed, rank 0 writes the summary the readers need, and every rank
returns the finished store.

Two preparers that tokenize the same unit (the same rank launched twice, a rerun while the first run
still goes) need no lease: a unit's shards and record are a deterministic function of the unit and the
header's settings, so both write the same bytes to the same keys, each object atomically; the only
cost is the duplicated work.

With ``--limit-tokens`` the stream is cut after that many tokens: a unit holds at most that many
tokens, units after the first ones that reach the limit are not tokenized (those already running may
be, and are then unused), and the summary cuts the last unit used.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from tqdm import tqdm

from selkd.cache import __version__
from selkd.cache.config import PrepareConfig
from selkd.cache.documents import CorpusStats, source_documents
from selkd.cache.errors import DataError
from selkd.cache.fingerprints import same_tokenizer, tokenizer_fingerprint
from selkd.cache.scoring import wait_for
from selkd.cache.sources import Source, resolve_specs
from selkd.cache.store import Storage, is_url
from selkd.cache.tokenizing import StreamHash, eos_id, tokenize_documents
from selkd.cache.tokens import (
    LOSS_MASK,
    ROOT_ATTR,
    SUMMARY_KEY,
    TOKENS_FORMAT,
    TOKENS_VERSION,
    UNIT_COMMITS_PREFIX,
    UNITS_KEY,
    TokenStore,
    TokenStoreError,
    content_hash,
    join_stats,
    read_header,
    shard_array,
    shard_name,
    stats_record,
    store_options,
    stream_hash_of,
    unit_commit_key,
    unit_name,
)
from selkd.cache.units import plan_units, source_record, unit_from_record, unit_record
from selkd.cache.writer import write_array

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def prepare_tokens(
    cfg: PrepareConfig,
    tokenizer: PreTrainedTokenizerBase,
    rank: int = 0,
    world: int = 1,
    storage: Storage | None = None,
    sources: list[Source] | None = None,
    argv: Sequence[str] | None = None,
) -> TokenStore:
    """Prepare (or resume preparing) the token store ``cfg`` describes; this preparer tokenizes its
    share (rank ``rank`` of ``world``) and returns once the store is finished. ``storage``: an already
    open store (an in-memory one for :func:`selkd.cache.corpus.load_corpus`) instead of ``cfg.out``;
    ``sources``: ``cfg.data`` already resolved."""
    eos_id(tokenizer)  # no EOS: refused before anything is written
    if sources is None:
        sources = resolve_specs(cfg.data, cfg.storage_option or None)
    new_dir = not is_url(cfg.out) and not Path(cfg.out).exists()  # removed again if nothing can be read
    if storage is None:
        storage = Storage.open(cfg.out, store_options(cfg.out, cfg.storage_option), mode="w")
    header, created = _claim(storage, _header(cfg, tokenizer, argv), tokenizer, rank)
    try:
        units = _units(storage, sources, rank, cfg.storage_option or None)
        mine = [u for u in range(len(units)) if u % world == rank]
        _tokenize(storage, cfg, tokenizer, units, mine, progress=cfg.progress and rank == 0)
        if rank == 0:
            records = _wait_for_units(storage, len(units), cfg.limit_tokens)
            summary = storage.read_json(SUMMARY_KEY) or _finalize(storage, header, records, cfg)
        else:
            wait_for(lambda: storage.exists(SUMMARY_KEY), "rank 0 to finish the token store")
            summary = storage.read_json(SUMMARY_KEY)
    except DataError:
        if created and world == 1:  # a store of data that cannot be read is no use: leave nothing behind
            storage.delete("zarr.json")
            for name in storage.list_dir(""):
                storage.delete_prefix(name)
            _remove_empty_dirs(storage.local_path, remove_root=new_dir)
        raise
    return TokenStore(storage, header, summary)


def _remove_empty_dirs(root: Path | None, remove_root: bool) -> None:
    """The directories a local store left after its keys were deleted (object stores have none), and
    the root itself if this command made it."""
    if root is None or not root.is_dir():
        return
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()
    if remove_root and not any(root.iterdir()):
        root.rmdir()


# ----------------------------------------------------------------------------------------------------
# Header and units


def _header(cfg: PrepareConfig, tokenizer: PreTrainedTokenizerBase, argv: Sequence[str] | None) -> dict[str, Any]:
    return {
        "format": TOKENS_FORMAT,
        "format_version": TOKENS_VERSION,
        "selkd_version": __version__,
        "tokenizer": cfg.tokenizer,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "tokenizer_size": len(tokenizer),
        "eos_token_id": eos_id(tokenizer),
        "data": {"specs": list(cfg.data), "text_field": cfg.text_field, "limit_tokens": cfg.limit_tokens},
        "command": list(argv) if argv is not None else None,
        "created": time.time(),
    }


def _differences(saved: dict[str, Any], current: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """What makes the stored token store another one than ``current`` asks for, as 'what: saved -> now'."""
    out = []
    if not same_tokenizer(str(saved.get("tokenizer_fingerprint")), tokenizer):
        out.append(f"tokenizer: {saved.get('tokenizer')} -> {current['tokenizer']} (fingerprints differ)")
    for key in ("specs", "text_field", "limit_tokens"):
        a, b = saved.get("data", {}).get(key), current["data"][key]
        if a != b:
            out.append(f"{'--data' if key == 'specs' else '--' + key.replace('_', '-')}: {a!r} -> {b!r}")
    return out


def _claim(
    storage: Storage, header: dict[str, Any], tokenizer: PreTrainedTokenizerBase, rank: int
) -> tuple[dict[str, Any], bool]:
    """The store's header and whether this call created the store: written by rank 0 into an empty
    store, else the stored one if it asks for the same token stream (TokenStoreError listing the
    differences otherwise)."""
    existing = read_header(storage)
    if existing is None and rank == 0:
        existing = _create_root(storage, header)
        if existing is None:
            return header, True
    elif existing is None:
        wait_for(lambda: read_header(storage) is not None, "rank 0 to create the token store")
        existing = read_header(storage)
    assert existing is not None
    diffs = _differences(existing, header, tokenizer)
    if diffs:
        raise TokenStoreError(
            f"{storage.url} was prepared with other settings; rerun with the original settings or choose a new "
            "location. Differences (stored -> now):\n  " + "\n  ".join(diffs)
        )
    return existing, False


def _create_root(storage: Storage, header: dict[str, Any]) -> dict[str, Any] | None:
    """Create the store's root with ``header`` (None: this call did), or the header another preparer
    of the same store wrote first (two rank 0s: a rerun started while the first still runs). Its root
    is the first key a preparer writes, so a store that holds files but, read after them, no header
    is foreign; its files may be the other preparer's, written since this one's first look."""
    if storage.is_empty():
        root = {"zarr_format": 3, "node_type": "group", "attributes": {ROOT_ATTR: header}}
        if storage.create_json("zarr.json", root):
            return None
    existing = read_header(storage)
    if existing is None:
        raise TokenStoreError(
            f"{storage.url}: holds files that are not a selkd token store; choose an empty or new location"
        )
    return existing


def _units(storage: Storage, sources: list[Source], rank: int, options: dict[str, Any] | None) -> list[Source]:
    """The units: planned by rank 0 and stored, or read back; the sources must not have changed."""
    found = [source_record(s) for s in sources]
    stored = storage.read_json(UNITS_KEY)
    if stored is None and rank == 0:
        units = plan_units(sources)
        storage.write_json(UNITS_KEY, {"sources": found, "units": [unit_record(u) for u in units]})
        return units
    if stored is None:
        wait_for(lambda: storage.exists(UNITS_KEY), "rank 0 to plan the units")
        stored = storage.read_json(UNITS_KEY)
    if stored["sources"] != found:
        old = {(r["path"], r["size"]) for r in stored["sources"]}
        new = {(r["path"], r["size"]) for r in found}
        raise TokenStoreError(
            f"{storage.url}: the data changed since the token store was prepared ({len(new - old)} source(s) new or "
            f"changed, {len(old - new)} gone, e.g. {sorted(new ^ old)[0][0] if new ^ old else 'their order'}); "
            "prepare into a new location"
        )
    return [unit_from_record(r, options) for r in stored["units"]]


# ----------------------------------------------------------------------------------------------------
# Tokenizing units


class _ShardWriter:
    """Cuts one unit's token chunks into shards of exactly ``shard_tokens`` tokens (the unit's last
    shard holds the rest) and writes each whole: tokens int32 [n], doc_start bool [n], loss_mask bool [n]."""

    def __init__(self, storage: Storage, unit: int, shard_tokens: int) -> None:
        self.storage, self.unit, self.shard_tokens = storage, unit, shard_tokens
        self.tokens: list[np.ndarray] = []
        self.starts: list[np.ndarray] = []  # document starts, offsets from the buffer's first token
        self.masks: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[list[Any]] = []  # [name, n_tokens] in order

    def add(self, tokens: np.ndarray, starts: np.ndarray, mask: np.ndarray) -> None:
        self.tokens.append(tokens)
        self.masks.append(mask)
        self.starts.append(starts + self.buffered)
        self.buffered += len(tokens)
        while self.buffered >= self.shard_tokens:
            self._write(self.shard_tokens)

    def close(self) -> None:
        if self.buffered:
            self._write(self.buffered)

    def _write(self, n: int) -> None:
        tokens, starts, mask = np.concatenate(self.tokens), np.concatenate(self.starts), np.concatenate(self.masks)
        doc_start = np.zeros(n, dtype=np.bool_)
        doc_start[starts[starts < n]] = True
        name = shard_name(self.unit, len(self.shards))
        write_array(self.storage, shard_array(name, "tokens"), tokens[:n])
        write_array(self.storage, shard_array(name, "doc_start"), doc_start)
        write_array(self.storage, shard_array(name, LOSS_MASK), mask[:n])
        self.shards.append([name, n])
        self.tokens, self.starts, self.masks = [tokens[n:]], [starts[starts >= n] - n], [mask[n:]]
        self.buffered -= n


def tokenize_unit(
    storage: Storage,
    unit: int,
    source: Source,
    text_field: str,
    tokenizer: PreTrainedTokenizerBase,
    cap: int | None,
    shard_tokens: int,
) -> dict[str, Any]:
    """Tokenize one unit (at most ``cap`` tokens of it) into shards of ``shard_tokens`` tokens, then
    commit it; returns the commit record. Memory: one shard's tokens plus one tokenizer batch."""
    t0 = time.time()
    stats = CorpusStats(text_field=text_field)
    stream = StreamHash()
    writer = _ShardWriter(storage, unit, shard_tokens)
    max_token = -1
    docs = source_documents(source, text_field, tokenizer, stats)
    for tokens, starts, mask in tokenize_documents(docs, tokenizer, stats, cap):
        stream.update(tokens, starts)
        writer.add(tokens, starts, mask)
        if len(tokens):
            max_token = max(max_token, int(tokens.max()))
    writer.close()
    record = {
        "unit": unit,
        "path": str(source.path),
        "part": source.part,
        "n_tokens": stream.n_tokens,
        "n_documents": stream.n_documents,
        "sha256": stream.digest(),
        "max_token": max_token,
        "shards": writer.shards,
        "stats": stats_record(stats),
        "seconds": round(time.time() - t0, 3),
        "host": socket.gethostname(),
    }
    storage.write_json(unit_commit_key(unit), record)
    return record


class _Prefix:
    """What is known of the committed units, to tell whether the token limit is already reached
    before a unit (then it and every later unit are not needed)."""

    def __init__(self, storage: Storage, limit: int | None) -> None:
        self.storage, self.limit = storage, limit
        self.records: dict[int, dict[str, Any]] = {}

    def reached_before(self, unit: int) -> bool:
        if self.limit is None:
            return False
        total = 0
        for u in range(unit):
            if u not in self.records:
                record = self.storage.read_json(unit_commit_key(u))
                if record is None:
                    return False  # not known yet: the unit may be needed
                self.records[u] = record
            total += self.records[u]["n_tokens"]
            if total >= self.limit:
                return True
        return False


def _tokenize(
    storage: Storage,
    cfg: PrepareConfig,
    tokenizer: PreTrainedTokenizerBase,
    units: list[Source],
    mine: list[int],
    progress: bool,
) -> None:
    """Tokenize this preparer's uncommitted units, in order, in this process or ``cfg.workers`` ones."""
    committed = set(storage.list_dir(UNIT_COMMITS_PREFIX))
    todo = [u for u in mine if f"{unit_name(u)}.json" not in committed]
    prefix = _Prefix(storage, cfg.limit_tokens)
    bar = tqdm(total=len(todo), unit="unit", desc="tokenizing", file=sys.stderr, disable=not progress)
    tokens = 0

    def done(record: dict[str, Any]) -> None:
        nonlocal tokens
        prefix.records[record["unit"]] = record
        tokens += record["n_tokens"]
        bar.update(1)
        bar.set_postfix(tokens=f"{tokens:,}", refresh=False)

    try:
        if cfg.workers == 1:
            for u in todo:
                if prefix.reached_before(u):
                    break
                done(tokenize_unit(storage, u, units[u], cfg.text_field, tokenizer, cfg.limit_tokens, cfg.shard_tokens))
        else:
            _tokenize_in_pool(cfg, tokenizer, units, todo, prefix, done)
    finally:
        bar.close()


def _tokenize_in_pool(
    cfg: PrepareConfig,
    tokenizer: PreTrainedTokenizerBase,
    units: list[Source],
    todo: list[int],
    prefix: _Prefix,
    done: Any,
) -> None:
    """``cfg.workers`` processes, at most one unit each in flight, submitted in unit order (so that the
    token limit stops the submissions). Each opens the store ``cfg.out`` itself (fsspec and zarr make
    new clients and event loops in a forked child). Forked where the platform can: a spawned worker
    would import torch and transformers again, tens of seconds on a busy machine. The parent has not
    tokenized anything, so each worker keeps the tokenizer's own thread pool (the tokenizers library
    turns it off in a child forked after the parent used it, and says so), sized to its share of the
    cores (:func:`tokenizer_threads`)."""
    fork = "fork" in multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if fork else "spawn")
    pool = ProcessPoolExecutor(
        cfg.workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(cfg.out, store_options(cfg.out, cfg.storage_option), tokenizer, tokenizer_threads(cfg.workers)),
    )
    inflight: dict[Future[dict[str, Any]], int] = {}
    pending = iter(todo)
    try:
        while True:
            while len(inflight) < cfg.workers:
                u = next(pending, None)
                if u is None or prefix.reached_before(u):
                    pending = iter(())
                    break
                job = (u, unit_record(units[u]), cfg.storage_option or None, cfg.text_field, cfg.limit_tokens)
                inflight[pool.submit(_worker_unit, *job, cfg.shard_tokens)] = u
            if not inflight:
                break
            finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
            for future in finished:
                inflight.pop(future)
                done(future.result())
    except BaseException:
        for process in list(getattr(pool, "_processes", {}).values()):  # do not wait for units in flight
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_WORKER: dict[str, Any] = {}


def tokenizer_threads(workers: int) -> int:
    """Threads of each worker's tokenizer pool: its share of the cores this process may run on (the
    Rust pool would otherwise start one thread per core in every worker, and W workers would run W
    times the cores' threads: on 2 cores, 2 workers with 2 threads each gained 9% over one worker where
    one thread each gained 44%)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // workers)


def limit_tokenizer_threads(threads: int) -> None:
    """Size this process's tokenizer pool before its first use, unless the user set it
    (``RAYON_NUM_THREADS``)."""
    if "RAYON_NUM_THREADS" in os.environ:
        return
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    if threads == 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _init_worker(
    location: str, options: dict[str, Any] | None, tokenizer: PreTrainedTokenizerBase, threads: int
) -> None:
    limit_tokenizer_threads(threads)
    _WORKER["storage"] = Storage.open(location, options, mode="w")
    _WORKER["tokenizer"] = tokenizer


def _worker_unit(
    unit: int, record: dict[str, Any], options: dict[str, Any] | None, text_field: str, cap: int | None, shard: int
) -> dict[str, Any]:
    source = unit_from_record(record, options)
    return tokenize_unit(_WORKER["storage"], unit, source, text_field, _WORKER["tokenizer"], cap, shard)


# ----------------------------------------------------------------------------------------------------
# Finishing


def _wait_for_units(storage: Storage, n_units: int, limit: int | None) -> list[dict[str, Any]]:
    """The commit records of the units the stream needs, in order, once all are committed (by any
    preparer): every unit, or the first ones that reach ``limit`` tokens."""
    records: dict[int, dict[str, Any]] = {}
    needed: list[dict[str, Any]] = []

    def complete() -> bool:
        needed.clear()
        total = 0
        for u in range(n_units):
            if u not in records:
                record = storage.read_json(unit_commit_key(u))
                if record is None:
                    return False
                records[u] = record
            needed.append(records[u])
            total += records[u]["n_tokens"]
            if limit is not None and total >= limit:
                break
        return True

    wait_for(complete, "other preparers to commit their units")
    return needed


def _finalize(
    storage: Storage, header: dict[str, Any], records: list[dict[str, Any]], cfg: PrepareConfig
) -> dict[str, Any]:
    """The summary of the stream ``records`` make (cut at the token limit), written once; DataError if
    the corpus has fewer than 2 tokens."""
    limit = cfg.limit_tokens
    shards: list[list[Any]] = []
    hashes: list[tuple[int, int, str]] = []
    total = documents = 0
    used: list[dict[str, Any]] = []
    for record in records:  # _wait_for_units gave no more than the limit needs
        n = record["n_tokens"] if limit is None else min(record["n_tokens"], limit - total)
        first_shard = len(shards)
        left = n
        for name, k in record["shards"]:
            if left > 0:
                shards.append([name, min(k, left)])
                left -= k
        if n == record["n_tokens"]:
            digest, n_docs = record["sha256"], record["n_documents"]
        else:  # the last unit, cut: hash what is used of it
            cut = TokenStore(storage, header, {"shards": shards[first_shard:], "n_tokens": n})
            stream = stream_hash_of(cut, 0, n)
            digest, n_docs = stream.digest(), stream.n_documents
        hashes.append((record["unit"], n, digest))
        used.append(record)
        total += n
        documents += n_docs
    stats = join_stats([r["stats"] for r in used], cfg.text_field)
    stats.documents = documents
    stats.files = len({r["path"] for r in used})
    if total < 2:
        hint = f"; {stats.warnings()[0]}" if stats.warnings() else f"; check text_field={cfg.text_field!r}"
        raise DataError(f"{', '.join(cfg.data)}: the corpus is empty ({total} token(s); at least 2 are needed){hint}")
    summary = {
        "n_tokens": total,
        "n_documents": documents,
        "units_used": len(used),
        "shards": shards,
        "content_sha256": content_hash(hashes),
        "max_token": max(r["max_token"] for r in used),
        "stats": stats_record(stats),
    }
    storage.write_json(SUMMARY_KEY, summary)
    return summary


# ----------------------------------------------------------------------------------------------------
# The token store of a build or an online run


class CorpusOptions(Protocol):
    """The corpus options a build and an online run share (a BuildConfig and a TrainConfig have them)."""

    tokens: str | None
    data: list[str]
    text_field: str | None
    limit_tokens: int | None
    storage_option: dict[str, Any]
    progress: bool


def corpus_tokens(
    options: CorpusOptions,
    *,
    prepare_into: str,
    tokenizer: PreTrainedTokenizerBase,
    tokenizer_name: str,
    rank: int,
    world: int,
) -> TokenStore:
    """The finished token store a consumer reads: ``options.tokens`` (prepared before) opened and checked
    to hold ``tokenizer``'s ids, or ``options.data`` prepared into ``prepare_into`` (resumed when it is
    there; rank 0 shows progress)."""
    if options.tokens is not None:
        store = TokenStore.open(options.tokens, options.storage_option or None)
        if not same_tokenizer(store.tokenizer_fingerprint, tokenizer):
            raise TokenStoreError(
                f"{store.url} holds ids of another tokenizer ({store.header['tokenizer']}) than {tokenizer_name}'s "
                "(fingerprints differ); prepare the data with this model's tokenizer"
            )
        return store
    cfg = PrepareConfig(
        data=options.data,
        tokenizer=tokenizer_name,
        out=prepare_into,
        text_field=options.text_field or "text",
        limit_tokens=options.limit_tokens,
        storage_option=options.storage_option,
        progress=options.progress and rank == 0,
    )
    return prepare_tokens(cfg, tokenizer, rank, world)

"""The tokenizing half of `selkd-cache prepare`: a preparer's units -> whole token shards and one
commit record per unit, in this process or ``--workers`` forked ones.

A unit is tokenized by :func:`tokenize_unit` alone: its tokens are cut into shards of exactly
``--shard-tokens`` tokens (:class:`ShardWriter`; the unit's last shard holds the rest), each written
whole, then the unit's commit record; memory is one shard plus one tokenizer batch. Units go in order,
so that ``--limit-tokens`` stops the submissions once the committed units before one reach it
(:class:`Prefix`). Each worker's tokenizer thread pool gets its share of the cores
(:func:`tokenizer_threads`). The layout is :mod:`selkd.cache.tokens`'; planning the units, the header
and the summary are :mod:`selkd.cache.prepare`'s.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from selkd.cache.config import PrepareConfig
from selkd.cache.documents import CorpusStats, source_documents
from selkd.cache.sources import Source
from selkd.cache.store import Storage
from selkd.cache.tokenizing import StreamHash, tokenize_documents
from selkd.cache.tokens import (
    LOSS_MASK,
    UNIT_COMMITS_PREFIX,
    shard_array,
    shard_name,
    stats_record,
    store_options,
    unit_commit_key,
    unit_name,
)
from selkd.cache.units import unit_from_record, unit_record
from selkd.cache.writer import write_array

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class ShardWriter:
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
    writer = ShardWriter(storage, unit, shard_tokens)
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


class Prefix:
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


def tokenize_units(
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
    prefix = Prefix(storage, cfg.limit_tokens)
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
    prefix: Prefix,
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

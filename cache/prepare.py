"""`selkd-cache prepare`: the corpus stage. Data specs -> units -> token shards -> a finished token store.

Every preparer (a torchrun rank, or ``--rank``/``--world-size``) resolves the same specs; rank 0 plans
the units (:mod:`selkd.cache.units`) and stores the plan; rank r tokenizes units r, r + W, ... in order,
alone or with ``--workers`` local processes, each unit by exactly one worker, written as whole shards
and committed by one atomic record (:mod:`selkd.cache.tokenize_units`; :mod:`selkd.cache.tokens` has the
layout). Memory per worker is
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

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from selkd.cache import __version__
from selkd.cache.config import PrepareConfig
from selkd.cache.errors import DataError
from selkd.cache.fingerprints import same_tokenizer, tokenizer_fingerprint
from selkd.cache.scoring import wait_for
from selkd.cache.sources import Source, resolve_specs
from selkd.cache.store import Storage, is_url
from selkd.cache.tokenize_units import tokenize_units
from selkd.cache.tokenizing import eos_id
from selkd.cache.tokens import (
    ROOT_ATTR,
    SUMMARY_KEY,
    TOKENS_FORMAT,
    TOKENS_VERSION,
    UNITS_KEY,
    TokenStore,
    TokenStoreError,
    content_hash,
    join_stats,
    read_header,
    stats_record,
    store_options,
    stream_hash_of,
    unit_commit_key,
)
from selkd.cache.units import plan_units, source_record, unit_from_record, unit_record

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
        tokenize_units(storage, cfg, tokenizer, units, mine, progress=cfg.progress and rank == 0)
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

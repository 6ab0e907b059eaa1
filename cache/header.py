"""The cache's root (``zarr.json``): the header a build writes (the format, the settings and the identity of
the teacher, tokenizer and corpus) and that a rerun must match, the summary :func:`finalize` adds once every
planned part is committed, and the check that ``--out`` is empty or a selkd cache.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from selkd.cache import __version__
from selkd.cache import format as fmt
from selkd.cache.config import SETTINGS_BEFORE_OPTION, SETTINGS_KEYS, BuildConfig
from selkd.cache.errors import BuildError
from selkd.cache.fingerprints import config_hash, same_tokenizer, tokenizer_fingerprint
from selkd.cache.reader import CacheError, header_classes, read_header
from selkd.cache.scoring import wait_for
from selkd.cache.store import Storage
from selkd.cache.teacher import num_classes
from selkd.cache.tokens import CACHE_TOKENS_PREFIX, FINGERPRINT_VERSION, Packing, TokenStore, store_options


def root_metadata(header: dict[str, Any], summary: dict[str, Any] | None) -> dict[str, Any]:
    attrs: dict[str, Any] = {fmt.ROOT_ATTR: header}
    if summary is not None:
        attrs[fmt.SUMMARY_ATTR] = summary
    return {"zarr_format": 3, "node_type": "group", "attributes": attrs}


def header_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings that change what is stored, as 'name: saved -> now' lines."""
    out = []
    for key in SETTINGS_KEYS:
        a, b = saved.get("settings", {}).get(key, SETTINGS_BEFORE_OPTION.get(key)), current["settings"][key]
        if a != b:
            out.append(f"--{key.replace('_', '-')}: {a!r} -> {b!r}")
    for key, label in (
        ("teacher_config_hash", "teacher model config"),
        ("tokenizer_fingerprint", "teacher tokenizer"),
        ("teacher_dtype", "--dtype"),
    ):
        if saved.get(key) != current[key]:
            out.append(f"{label}: {saved.get(key)} -> {current[key]}")
    if saved.get("data", {}).get("fingerprint_version", 1) != current["data"]["fingerprint_version"]:
        out.append("data: the cache was started by an older selkd (another corpus fingerprint); use a new --out")
    elif saved.get("data", {}).get("fingerprint") != current["data"]["fingerprint"]:
        out.append("data: the corpus (its token stream) is not the same")
    if header_classes(saved) != current["num_classes"]:  # a cache started before padding was dropped
        out.append(f"classes (target width): {header_classes(saved)} -> {current['num_classes']}")
    if saved.get("sample_selection") != current["sample_selection"]:
        out.append(f"sample selection: {saved.get('sample_selection')} -> {current['sample_selection']}")
    return out


def open_output(cfg: BuildConfig) -> tuple[Storage, dict[str, Any] | None]:
    """The output store and its existing header (None if new); refuses foreign contents."""
    storage = Storage.open(cfg.out, store_options(cfg.out, cfg.storage_option), mode="w")
    if storage.is_empty():
        return storage, None
    # One listing decides: under torchrun rank 0 may write the root between two separate checks.
    names = set(storage.list_dir(""))
    if "zarr.json" not in names and names - {CACHE_TOKENS_PREFIX}:
        raise BuildError(
            f"{storage.url}: holds files that are not a selkd cache; choose an empty or new location for --out"
        )
    try:
        return storage, read_header(storage) if "zarr.json" in names else None
    except CacheError as err:
        raise BuildError(f"{err}; choose an empty or new location for --out") from err


def finalize(storage: Storage) -> dict[str, Any]:
    """Aggregate the commit records into the root summary. Needs every planned part committed."""
    header = read_header(storage)
    plan = storage.read_json(fmt.PLAN_KEY)
    if plan is None:
        raise BuildError(f"{storage.url}: no part plan yet; the build has not got past its planning step")
    records = {}
    for name in storage.list_dir(fmt.COMMITS_PREFIX):
        rec = storage.read_json(f"{fmt.COMMITS_PREFIX}/{name}")
        records[rec["part"]] = rec
    missing = [p["name"] for p in plan["parts"] if p["name"] not in records]
    if missing:
        raise BuildError(
            f"{storage.url}: {len(missing)} of {len(plan['parts'])} parts are not committed "
            f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); rerun the build to finish them"
        )
    summary: dict[str, Any] = {"parts": len(records), "finalized_at": time.time()}
    for split in ("train", "eval"):
        recs = [r for r in records.values() if r["split"] == split]
        summary[f"{split}_sequences"] = sum(r["n_sequences"] for r in recs)
        summary[f"{split}_tokens"] = sum(r["n_tokens"] for r in recs)
        summary[f"{split}_targets"] = sum(r["n_targets"] for r in recs)
        summary[f"{split}_skipped"] = sum(r.get("n_skipped", 0) for r in recs)
    summary["bytes_parts"] = sum(r["bytes"] for r in records.values())
    storage.write_json("zarr.json", root_metadata(header, summary))
    return summary


def make_header(
    cfg: BuildConfig,
    argv: Sequence[str] | None,
    teacher: Any,
    dtype: torch.dtype,
    tokenizer: Any,
    vocab: int,
    tokens: TokenStore,
    corpus: Packing,
    is_eval: np.ndarray,
) -> dict[str, Any]:
    """The cache header (the root's ``selkd`` attribute): the format, the settings and the identity of
    the teacher, tokenizer and corpus, which a rerun must match (:func:`header_differences`)."""
    spec = cfg.class_spec
    return {
        "format": fmt.FORMAT_NAME,
        "format_version": fmt.FORMAT_VERSION,
        "selkd_version": __version__,
        "settings": {k: getattr(cfg, k) for k in SETTINGS_KEYS},
        "teacher": cfg.teacher,
        "teacher_config_hash": config_hash(teacher),
        "teacher_dtype": str(dtype).removeprefix("torch."),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "tokenizer_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "vocab_size": vocab,  # the teacher's head rows
        "num_classes": num_classes(tokenizer),  # what target ids index (reader.header_classes)
        "classes": {"mode": spec.mode, "k": spec.k, "text": str(spec)},
        "temperature": cfg.temperature,
        "max_seq_len": cfg.max_seq_len,
        "data": {
            **tokens.header["data"],  # specs, text_field, limit_tokens
            "tokens": tokens.url,
            "fingerprint": corpus.fingerprint,
            "fingerprint_version": FINGERPRINT_VERSION,
            "n_tokens": corpus.n_tokens,
            "n_sequences": corpus.n_sequences,
            "documents": corpus.stats.documents,
        },
        "eval": {"fraction": cfg.eval_fraction, "n_sequences": int(is_eval.sum())},
        "sample_selection": None
        if cfg.sample_ratio is None
        else {"ratio": cfg.sample_ratio, "signal": cfg.sample_signal, "student": cfg.student},
        "command": list(argv) if argv is not None else None,
        "created": time.time(),
    }


def agree_header(
    storage: Storage, existing: dict[str, Any] | None, header: dict[str, Any], tokenizer: Any, rank: int, world: int
) -> None:
    """A new cache gets ``header`` (from rank 0; the others wait for it); an existing one must have been
    built with the same settings."""
    if existing is not None:
        if same_tokenizer(str(existing.get("tokenizer_fingerprint")), tokenizer):
            # an older fingerprint version of the same tokenizer: compare the rest as stored
            header["tokenizer_fingerprint"] = existing["tokenizer_fingerprint"]
        diffs = header_differences(existing, header)
        if diffs:
            raise BuildError(
                f"{storage.url} was built with other settings; rerun with the original settings or choose a new "
                "--out. Differences (stored -> now):\n  " + "\n  ".join(diffs)
            )
    elif rank == 0 or world == 1:
        if not storage.create_json("zarr.json", root_metadata(header, None)):
            # another builder of this --out (a rerun started while the first runs) was first: same settings?
            agree_header(storage, read_header(storage), header, tokenizer, rank, world)
    else:
        wait_for(lambda: storage.exists("zarr.json"), "rank 0 to create the cache")

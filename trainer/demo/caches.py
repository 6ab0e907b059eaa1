"""Stage 5 of the demo: the two caches (``selkd-cache build`` in-process), and the held-out split read
back from them."""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from selkd.trainer.demo.settings import CLASSES, SAMPLE_RATIO, SEED
from selkd.trainer.demo.state import Corpus, Run
from selkd.trainer.demo.util import as_cli, human_bytes, logged, read_json, say, write_json


@dataclass
class Cache:
    path: Path
    stats: dict[str, Any]  # the stamp: its key (inputs) and what info says about it


def cache_stage(run: Run, corpus: Corpus, teacher_dir: Path, base_dir: Path) -> dict[str, Cache]:
    """``full`` (every sequence) and ``sel20`` (the top SAMPLE_RATIO by the base student's entropy)."""
    from selkd.cache.config import BuildConfig

    budget = run.budget
    caches: dict[str, Cache] = {}
    with run.stages.stage(
        "caches", f"caches: selkd-cache build --classes {CLASSES} (all sequences; top {SAMPLE_RATIO:g})"
    ):
        for name in ("full", "sel20"):
            path = run.out / "caches" / name
            cfg = BuildConfig(
                teacher=str(teacher_dir),
                data=[str(corpus.kd_path)],
                out=str(path),
                classes=CLASSES,
                max_seq_len=budget.seq_len,
                eval_fraction=corpus.eval_fraction,
                seed=SEED,
                device="cpu",
                batch_size=budget.cache_batch,
                progress=False,
                **({"student": str(base_dir), "sample_ratio": SAMPLE_RATIO} if name == "sel20" else {}),
            )
            command = as_cli("selkd-cache build", cfg, BuildConfig(teacher="T", data=["D"], out="O"), ["classes"])
            run.commands.append(command)
            key = {
                "teacher": str(teacher_dir),
                "base": str(base_dir),
                "kd": corpus.kd_hash,
                "cfg": dataclasses.asdict(cfg),
            }
            caches[name] = Cache(path, _build_cache(run, name, cfg, command, key))
    return caches


def _build_cache(run: Run, name: str, cfg: Any, command: str, key: dict[str, Any]) -> dict[str, Any]:
    """Build the cache ``cfg`` describes, unless a finished one of the same ``key`` is there; its stamp."""
    from selkd.cache.build import build_cache
    from selkd.cache.info import cache_info
    from selkd.cache.reader import open_cache

    path = Path(cfg.out)
    stamp_path = path.with_name(path.name + ".selkd-demo.json")
    stamp = read_json(stamp_path)
    if stamp is not None and stamp.get("key") == key and "bytes" in stamp and _complete(path):
        say(f"      {name}: reused {path} (built in {stamp['seconds']:.0f} s)")
        return stamp
    if path.exists() and (stamp is None or stamp.get("key") != key):
        shutil.rmtree(path)  # built from other inputs: a build would refuse to resume it
    write_json(stamp_path, {"key": key})  # same key next time: an interrupted build resumes
    say(f"      {name}: {command}")
    t0 = time.perf_counter()
    with logged(run.logs / f"cache-{name}.log"):
        build_cache(cfg, argv=command.split())
    seconds = time.perf_counter() - t0
    info = cache_info(open_cache(str(path)))
    stamp = {
        "key": key,
        "seconds": seconds,
        "bytes": info.bytes_on_disk,
        "positions": info.positions_stored,
        "bytes_per_position": info.bytes_per_stored_position,
        "bytes_per_corpus_position": info.bytes_per_corpus_position,
        "sequences_train": info.sequences_train,
        "sequences_eval": info.sequences_eval,
        "mean_unique_ids": info.mean_unique_ids,
        "mean_teacher_entropy": info.mean_teacher_entropy,
    }
    write_json(stamp_path, stamp)
    say(
        f"      {name}: {info.sequences_train:,} train + {info.sequences_eval:,} held-out sequences, "
        f"{human_bytes(info.bytes_on_disk)} ({info.bytes_per_stored_position or 0:.1f} B/position) in "
        f"{seconds:.0f} s"
    )
    return stamp


def held_out(cache: Path, eval_fraction: float) -> list[np.ndarray]:
    """The held-out sequences, read back from the cache: the exact split every trainer evaluates on."""
    from selkd.cache.corpus import eval_mask
    from selkd.cache.reader import open_cache

    reader = open_cache(str(cache))
    eval_seqs = [np.asarray(s.input_ids) for s in reader.eval_sequences()]
    eval_index = sorted(s.seq_index for s in reader.eval_sequences())
    held = eval_mask(int(reader.header["data"]["n_sequences"]), eval_fraction, SEED)
    if eval_index != np.flatnonzero(held).tolist():
        raise RuntimeError("the cache's eval split differs from the one pretraining left out")
    return eval_seqs


def _complete(path: Path) -> bool:
    """Whether ``path`` holds a finalized cache (every part committed)."""
    from selkd.cache.reader import CacheError, open_cache

    try:
        return open_cache(str(path)).summary is not None
    except (CacheError, OSError, ValueError):
        return False

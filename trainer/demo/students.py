"""Stage 6 of the demo: every compared method continues the base student (``selkd-train`` in-process)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from selkd.trainer.demo.caches import Cache
from selkd.trainer.demo.machine import peak_memory_mb, reset_peak_memory
from selkd.trainer.demo.settings import METHODS, SEED, Method
from selkd.trainer.demo.state import Corpus, Run
from selkd.trainer.demo.util import as_cli, logged, read_json, say, write_json


def students_stage(
    run: Run, corpus: Corpus, teacher_dir: Path, base_dir: Path, caches: dict[str, Cache]
) -> dict[str, dict[str, Any]]:
    """Every method of METHODS continues the base student for the same steps; each run's stamp by key."""
    from selkd.trainer.config import TrainConfig

    budget = run.budget
    eval_every = max(1, budget.kd_steps // budget.evals)
    common = {
        "student": str(base_dir),
        "steps": budget.kd_steps,
        "batch_size": budget.kd_batch,
        "lr": budget.kd_lr,
        "warmup_steps": budget.warmup_steps,
        "seed": SEED,
        "device": "cpu",
        "num_workers": 0,
        "eval_every": eval_every if eval_every < budget.kd_steps else 0,
        "log_every": max(1, budget.kd_steps // 25),
        "save_every": 0,
        "progress": False,
    }
    records: dict[str, dict[str, Any]] = {}
    with run.stages.stage(
        "students", f"students: {len(METHODS)} methods x {budget.kd_steps} steps from the base student"
    ):
        for m in METHODS:
            run_out = run.out / "runs" / m.key
            if m.kind == "online":
                data = {"teacher": str(teacher_dir), "data": [str(corpus.kd_path)], "max_seq_len": budget.seq_len}
                cfg = TrainConfig(
                    out=str(run_out), **data, eval_fraction=corpus.eval_fraction, select=m.select, **common
                )
                defaults = TrainConfig(out="O", teacher="T", data=["D"], student="S")
            else:
                cache = str(caches[m.cache or "full"].path)
                weights = {"kd_weight": m.kd_weight, "ce_weight": m.ce_weight}
                cfg = TrainConfig(out=str(run_out), cache=cache, select=m.select, **weights, **common)
                defaults = TrainConfig(out="O", cache="C", student="S")
            command = as_cli("selkd-train", cfg, defaults)
            run.commands.append(command)
            key = {
                "cfg": cfg.to_dict(),
                "teacher": str(teacher_dir),
                "cache": caches[m.cache].stats["key"] if m.cache else None,
                "kind": m.kind,
            }
            records[m.key] = _train_student(run, m, cfg, command, key)
    return records


def _train_student(run: Run, m: Method, cfg: Any, command: str, key: dict[str, Any]) -> dict[str, Any]:
    """Train method ``m`` (``cfg``), unless a finished run of the same ``key`` is there (and not --rerun)."""
    from selkd.trainer.loop import train

    run_out = Path(cfg.out)
    stamp_path = run_out / "selkd-demo.json"
    stamp = read_json(stamp_path)
    done = (run_out / "final" / "config.json").is_file()
    if not run.rerun and stamp is not None and stamp.get("key") == key and done:
        say(f"      {m.label}: reused {run_out} (trained in {stamp['wall_s']:.0f} s)")
        return {**stamp, "reused": True}
    if run_out.exists():
        shutil.rmtree(run_out)
    say(f"      {m.label} ...")
    reset_peak_memory()
    t0 = time.perf_counter()
    with logged(run.logs / f"train-{m.key}.log"):
        say(command)
        result = train(cfg)
    wall = time.perf_counter() - t0
    stamp = {
        "key": key,
        "wall_s": wall,
        "peak_mb": peak_memory_mb(),
        "final": result.get("final"),
        "steps": result["step"],
    }
    write_json(stamp_path, stamp)
    say(
        f"      {m.label}: {result['step']} steps in {wall:.0f} s, trainer's held-out CE "
        f"{result.get('eval_ce', float('nan')):.3f}"
    )
    return {**stamp, "reused": False}

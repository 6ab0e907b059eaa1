"""Stage 7 of the demo: every model scored on the same held-out sequences."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selkd.trainer.demo.caches import Cache
from selkd.trainer.demo.models import score_sequences
from selkd.trainer.demo.passage import Passage, select_passage
from selkd.trainer.demo.pretraining import Pretraining
from selkd.trainer.demo.report import Row, read_metrics
from selkd.trainer.demo.settings import METHODS, Method
from selkd.trainer.demo.state import Run
from selkd.trainer.demo.util import say


def evaluation_stage(
    run: Run,
    pre: Pretraining,
    teacher_dir: Path,
    base_dir: Path,
    caches: dict[str, Cache],
    runs: dict[str, dict[str, Any]],
    eval_seqs: list[np.ndarray],
) -> tuple[list[Row], Passage]:
    """Held-out CE and top-1 agreement with the teacher of the teacher, the base and every student (with
    their curves), and the held-out passage SE-KD's selection is drawn on."""
    from selkd.cache.teacher import load_causal_lm

    rows: list[Row] = []
    with run.stages.stage("evaluate", f"evaluation: {len(eval_seqs)} held-out sequences, teacher, base and students"):
        teacher = load_causal_lm(str(teacher_dir), "cpu", torch.float32)
        t_ce, _, t_top = score_sequences(teacher, eval_seqs)
        del teacher
        base = load_causal_lm(str(base_dir), "cpu", torch.float32)
        b_ce, b_agree, _ = score_sequences(base, eval_seqs, t_top)
        sekd_cfg = runs["sekd"]["key"]["cfg"]
        passage = select_passage(base, pre.tokenizer, eval_seqs[0], sekd_cfg["select"], sekd_cfg["select_policy"])
        del base
        for what, ce, agree in (("teacher", t_ce, None), ("base", b_ce, b_agree)):
            rec = pre.records[what]
            label = f"{'teacher' if what == 'teacher' else 'base student (start of every method)'}"
            label += f" ({rec['params'] / 1e6:.2f}M, {rec['seconds']:.0f} s CE)"
            rows.append(_row(what, label, ce, agree, rec["seconds"], rec.get("peak_mb"), rec["reused"], rec["params"]))
        for m in METHODS:
            rows.append(_student_row(run, m, runs[m.key], caches, eval_seqs, t_top, b_ce))
        n_pos = sum(len(s) - 1 for s in eval_seqs)
        say(f"      teacher {rows[0].eval_ce:.3f}, base {rows[1].eval_ce:.3f} nats on {n_pos:,} positions")
    return rows, passage


def _student_row(
    run: Run,
    m: Method,
    rec: dict[str, Any],
    caches: dict[str, Cache],
    eval_seqs: list[np.ndarray],
    t_top: list[torch.Tensor],
    base_ce: float,
) -> Row:
    """Method ``m``'s row: its final student scored, and its curves from ``metrics.jsonl``. The held-out
    curve starts at the base student's CE (step 0) and ends at the final score."""
    from selkd.cache.teacher import load_causal_lm

    run_out = run.out / "runs" / m.key
    ce, agree, _ = score_sequences(load_causal_lm(str(run_out / "final"), "cpu", torch.float32), eval_seqs, t_top)
    stats = caches[m.cache].stats if m.kind == "cache" and m.uses_teacher and m.cache else None
    row = _row(m.key, m.label, ce, agree, rec["wall_s"], rec["peak_mb"], rec["reused"], None, stats)
    metrics = read_metrics(run_out / "metrics.jsonl")
    steps = rec["steps"]
    row.curve, row.kd_curve, row.ce_curve, row.clock = metrics.loss, metrics.kd, metrics.ce, metrics.clock
    row.eval_curve = [[0, base_ce], *(e for e in metrics.eval_ce if 0 < e[0] < steps), [steps, ce]]
    return row


def _row(
    key: str,
    label: str,
    ce: float,
    agree: float | None,
    wall_s: float,
    peak_mb: float | None,
    reused: bool,
    params: int | None,
    cache: dict[str, Any] | None = None,
) -> Row:
    """A table row; ``cache``: the stamp of the cache the method reads, if it reads the teacher's targets."""
    return Row(
        key,
        label,
        ce,
        math.exp(min(ce, 50)),
        agree,
        wall_s,
        peak_mb,
        None if cache is None else int(cache["bytes"]),
        None if cache is None else cache["bytes_per_position"],
        None if cache is None else cache["bytes_per_corpus_position"],
        reused=reused,
        cache_build_s=None if cache is None else cache["seconds"],
        params=params,
    )

"""Stage 8 of the demo: the table, the reading, the plots, report.md and results.json."""

from __future__ import annotations

import dataclasses
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selkd.trainer.demo.caches import Cache
from selkd.trainer.demo.machine import machine_info
from selkd.trainer.demo.passage import Passage
from selkd.trainer.demo.plots import make_plots
from selkd.trainer.demo.pretraining import Pretraining
from selkd.trainer.demo.reading import (
    TEACHER_MARGIN,
    EqualTime,
    base_sentence,
    equal_time,
    reading,
    table_note,
    winners,
)
from selkd.trainer.demo.report import DemoResult, Row, format_table, write_report
from selkd.trainer.demo.settings import CLASSES, SAMPLE_RATIO, SEED, SELECT, Shape
from selkd.trainer.demo.state import Corpus, Run
from selkd.trainer.demo.util import fmt_s, human_bytes, say, write_json


def report_stage(
    run: Run,
    corpus: Corpus,
    pre: Pretraining,
    teacher_dir: Path,
    base_dir: Path,
    caches: dict[str, Cache],
    evaluated: tuple[list[Row], Passage],
    n_eval: int,
) -> DemoResult:
    """The table with its reading, report.md, the plots and results.json; the table, the reading and the
    warnings are printed too."""
    rows, passage = evaluated
    run.warnings += _teacher_warnings(rows)
    eq = equal_time(rows)  # fills each student's eq_time_ce
    table = format_table(rows)
    words = [*reading(rows, eq), base_sentence(pre.records["base"])]
    cache_stats = {name: c.stats for name, c in caches.items()}
    settings = _settings(run, corpus, pre, teacher_dir, base_dir, cache_stats, n_eval)
    with run.stages.stage("report", "report"):
        notes = [*run.warnings, *(_cache_note(n, s) for n, s in cache_stats.items())]
        plots = make_plots(rows, pre.records, eq, passage, run.out)
        machine = machine_info(run.threads)
        stage_seconds = dict(run.stages.seconds)
        note = table_note(eq, rows)
        report = write_report(
            run.out, rows, table, settings, machine, stage_seconds, run.commands, plots, notes, words, note
        )
        total = time.perf_counter() - run.t_start
        result = DemoResult(rows, table, report, plots, settings, stage_seconds, total, run.warnings, words)
        results = {
            "rows": [dataclasses.asdict(r) for r in rows],
            "equal_time": None if eq is None else dataclasses.asdict(eq),
            "winners": winners(rows),
            "reading": words,
            "settings": settings,
            "machine": machine,
            "stage_seconds": stage_seconds,
            "total_seconds": total,
            "warnings": run.warnings,
        }
        write_json(run.out / "results.json", results)
    _print(run, table, eq, rows, words, report)
    return result


def _print(run: Run, table: str, eq: EqualTime | None, rows: Sequence[Row], words: Sequence[str], report: Path) -> None:
    say("")
    say(table)
    say("")
    for paragraph in (table_note(eq, rows), *words):
        say(textwrap.fill(paragraph.replace("**", ""), 110))
        say("")
    for w in run.warnings:
        say(f"warning: {w}")
    say(f"report: {report}   (total {fmt_s(time.perf_counter() - run.t_start)})")


def _teacher_warnings(rows: Sequence[Row]) -> list[str]:
    """A warning for each student the teacher is not clearly (TEACHER_MARGIN) better than."""
    by_key = {r.key: r for r in rows}
    teacher = by_key["teacher"].eval_ce
    return [
        f"the teacher ({teacher:.3f}) is not clearly better than the {other} student "
        f"({by_key[other].eval_ce:.3f}) on held-out CE, so the comparison says little: the time-budgeted "
        "teacher trained too little (a slow or busy machine, --quick or --budget-scale below 1; the full demo "
        "trains a stronger one)"
        for other in ("base", "ce-only")
        if teacher > by_key[other].eval_ce - TEACHER_MARGIN
    ]


def _cache_note(name: str, s: dict[str, Any]) -> str:
    return (
        f"Cache `{name}`: {s['sequences_train']:,} training sequences, {human_bytes(s['bytes'])}, built in "
        f"{s['seconds']:.0f} s ({s['mean_unique_ids'] or 0:.1f} unique ids per position, teacher entropy "
        f"{s['mean_teacher_entropy'] or 0:.2f} nats)."
    )


def _settings(
    run: Run,
    corpus: Corpus,
    pre: Pretraining,
    teacher_dir: Path,
    base_dir: Path,
    cache_stats: dict[str, dict[str, Any]],
    n_eval: int,
) -> dict[str, Any]:
    """The run's settings as report.md and results.json record them."""
    budget = dataclasses.asdict(run.budget)
    return {
        "budget": {k: (dataclasses.asdict(v) if isinstance(v, Shape) else v) for k, v in budget.items()},
        "budget_scale": run.budget_scale,
        "kd_steps_nominal": run.nominal_kd_steps,
        "corpus": corpus.name,
        "kd_corpus_rows": len(corpus.kd_rows),
        "extra_rows": len(corpus.extra_rows),
        "eval_fraction": corpus.eval_fraction,
        "eval_sequences": n_eval,
        "classes": CLASSES,
        "select": SELECT,
        "sample_ratio": SAMPLE_RATIO,
        "seed": SEED,
        "models": str(pre.home),
        "teacher_dir": str(teacher_dir),
        "base_dir": str(base_dir),
        "kd_data": str(corpus.kd_path),
        "caches": {k: {kk: vv for kk, vv in v.items() if kk != "key"} for k, v in cache_stats.items()},
        "pretraining": {
            k: {kk: vv for kk, vv in v.items() if kk not in ("curve", "key")} for k, v in pre.records.items()
        },
    }

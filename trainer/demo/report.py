"""The demo's results: the table, the findings and report.md (the plots: plots.py; the reading: reading.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selkd.trainer.demo.settings import CLASSES, SAMPLE_RATIO, SEED, SELECT
from selkd.trainer.demo.util import fmt_s, human_bytes

# ----------------------------------------------------------------------------- results


@dataclass
class Row:
    """One line of the table."""

    key: str
    label: str
    eval_ce: float
    eval_ppl: float
    top1_agree: float | None  # with the teacher's argmax; None for the teacher itself
    wall_s: float  # pretraining time (teacher, base) or training time (students)
    peak_mb: float | None
    cache_bytes: int | None  # None: no cache involved
    bytes_per_position: float | None  # per stored position
    bytes_per_corpus_position: float | None  # per position of the KD corpus (the storage actually paid)
    reused: bool = False  # taken from an earlier run with identical inputs
    cache_build_s: float | None = None  # time the cache this method reads took to build
    params: int | None = None
    curve: list[list[float]] = field(default_factory=list)  # [step, train loss]
    eval_curve: list[list[float]] = field(default_factory=list)  # [step, held-out CE], step 0: the base
    kd_curve: list[list[float]] = field(default_factory=list)  # [step, KD divergence] (KD methods)
    ce_curve: list[list[float]] = field(default_factory=list)  # [step, CE term] (where it is weighted)
    clock: list[list[float]] = field(default_factory=list)  # [step, cumulative seconds of training steps]
    eq_time_ce: float | None = None  # held-out CE at equal wall time (see reading.py)


@dataclass
class DemoResult:
    """What :func:`run_demo` produced (also written to ``OUT/results.json``)."""

    rows: list[Row]
    table: str
    report: Path
    plots: list[Path]
    settings: dict[str, Any]
    stage_seconds: dict[str, float]
    total_seconds: float
    warnings: list[str]
    reading: list[str] = field(default_factory=list)  # the plain reading under the table (reading.py)


def format_table(rows: Sequence[Row]) -> str:
    """The table as aligned plain text (also valid Markdown)."""
    head = [
        "method",
        "held-out CE",
        "CE, equal time",
        "PPL",
        "top-1 agree",
        "wall time",
        "peak mem",
        "cache bytes",
        "B/pos",
        "B/corpus pos",
        "cache build",
    ]

    def opt(x: float | None, spec: str) -> str:
        return "—" if x is None else format(x, spec)

    body = []
    for r in rows:
        body.append(
            [
                r.label + (" *" if r.reused else ""),
                f"{r.eval_ce:.3f}",
                opt(r.eq_time_ce, ".3f"),
                f"{r.eval_ppl:.1f}",
                opt(r.top1_agree, ".3f"),
                fmt_s(r.wall_s),
                opt(r.peak_mb, ",.0f") + (" MB" if r.peak_mb is not None else ""),
                "—" if r.cache_bytes is None else human_bytes(r.cache_bytes),
                opt(r.bytes_per_position, ".1f"),
                opt(r.bytes_per_corpus_position, ".1f"),
                "—" if r.cache_build_s is None else fmt_s(r.cache_build_s),
            ]
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        out = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "| " + " | ".join(out) + " |"

    sep = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), sep, *(line(b) for b in body)])


@dataclass
class Metrics:
    """A student run's curves, from its ``metrics.jsonl``: each a list of [step, value]."""

    loss: list[list[float]] = field(default_factory=list)  # the training objective
    kd: list[list[float]] = field(default_factory=list)  # its divergence term
    ce: list[list[float]] = field(default_factory=list)  # its CE term
    eval_ce: list[list[float]] = field(default_factory=list)  # held-out CE
    clock: list[list[float]] = field(default_factory=list)  # cumulative seconds of training steps


def read_metrics(path: Path) -> Metrics:
    """The curves of a run's ``metrics.jsonl`` (a torn or unreadable line is skipped). The clock adds each
    logged window's steps times its mean step time, so evaluations and saving do not count."""
    m = Metrics()
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return m
    last_step, seconds = 0, 0.0
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        step = row.get("step", 0)
        if row.get("eval"):
            if "eval_ce" in row:
                m.eval_ce.append([step, row["eval_ce"]])
            continue
        if "loss" not in row:
            continue
        m.loss.append([step, row["loss"]])
        for key, curve in (("kd", m.kd), ("ce", m.ce)):
            if key in row:
                curve.append([step, row[key]])
        if "step_time_s" in row and step > last_step:
            seconds += row["step_time_s"] * (step - last_step)
            m.clock.append([step, seconds])
            last_step = step
    return m


def _vs(ce: float, ref: float) -> str:
    """'0.123 nats better than' / 'worse than' (lower held-out CE is better)."""
    d = ce - ref
    return f"{abs(d):.3f} nats {'better' if d < 0 else 'worse'} than"


def findings(rows: Sequence[Row]) -> list[str]:
    """Plain statements read off the table (no claims beyond these numbers and this budget)."""
    by = {r.key: r for r in rows}
    teacher, base, ce_only = by["teacher"], by["base"], by["ce-only"]
    out = [
        f"The teacher is {_vs(teacher.eval_ce, base.eval_ce)} the base student and "
        f"{_vs(teacher.eval_ce, ce_only.eval_ce)} the CE-only student on held-out CE."
    ]
    full, sekd, three = by["kd-cache"], by["sekd"], by["sekd-3x"]
    size = (three.cache_bytes or 0) / max(1, full.cache_bytes or 1)
    build = (three.cache_build_s or 0.0) / max(1e-9, full.cache_build_s or 0.0)
    out.append(
        f"From the same cache, SE-KD is {_vs(sekd.eval_ce, full.eval_ce)} full KD and "
        f"{_vs(sekd.eval_ce, ce_only.eval_ce)} CE only; SE-KD 3X is {_vs(three.eval_ce, full.eval_ce)} full KD, "
        f"from a cache {size:.0%} the size built in {build:.0%} of the time."
    )
    return out


def write_report(
    out: Path,
    rows: Sequence[Row],
    table: str,
    settings: dict[str, Any],
    machine: dict[str, Any],
    stage_seconds: dict[str, float],
    commands: Sequence[str],
    plots: Sequence[Path],
    notes: Sequence[str],
    reading: Sequence[str],
    eq_note: str,
) -> Path:
    """``OUT/report.md``: the table, what was compared and how, the machine, the curves."""
    b = settings["budget"]
    reused = " `*`: reused from an earlier run with identical inputs." if any(r.reused for r in rows) else ""
    lines = [
        "# selkd demo report",
        "",
        f"Budget **{b['name']}**; corpus: {settings['corpus']}. Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.",
        "",
        table,
        "",
        TABLE_NOTE + " " + eq_note + reused,
        "",
        *_section("Reading", [f"{p}\n" for p in reading]),
        *_section("Findings", [f"- {f}" for f in findings(rows)]),
        *(_section("Notes", [f"- {n}" for n in notes]) if notes else []),
        *_section("What was compared", _methods_compared(b)),
        *_section("Settings", ["```json", json.dumps(settings, indent=2, default=str), "```"]),
        *_section("Stage times (this run)", [f"- {k}: {fmt_s(v)}" for k, v in stage_seconds.items()]),
        *_section("Machine", [f"- {k}: {v}" for k, v in machine.items()]),
        *_section(
            "Commands", ["The demo runs these stages in-process; each is equivalent to:", "", "```sh", *commands, "```"]
        ),
        *(_section("Plots", ["\n\n".join(f"![{p.stem}]({p.name})" for p in plots)]) if plots else []),
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


TABLE_NOTE = (
    "Held-out CE and perplexity are measured on the caches' eval split (never trained on by any model, "
    "teacher and base included); top-1 agreement is the share of those positions where the model's argmax "
    "is the teacher's. Wall time is pretraining time for the teacher and the base student and training "
    "time (load, steps, evaluations, save) for the compared students. "
    "Peak memory is the process's peak resident set during that stage. B/pos: cache bytes per stored "
    "position; B/corpus pos: per position of the KD corpus; cache build: the teacher pass (and, for the "
    "20% cache, the base student's scoring pass) that wrote the cache the method reads."
)


def _section(title: str, body: Sequence[str]) -> list[str]:
    return [f"## {title}", "", *body, ""]


def _methods_compared(b: dict[str, Any]) -> list[str]:
    """The report's account of the compared methods, from the budget ``b`` (as in the settings)."""
    return [
        f"Every student starts from the same base checkpoint (the student architecture pretrained with plain CE "
        f"for {b['base_seconds']:.0f} s) and trains {b['kd_steps']} steps of {b['kd_batch']} x {b['seq_len']} tokens "
        f"at peak learning rate {b['kd_lr']:g} (AdamW, {b['warmup_steps']} warm-up steps, cosine decay), seed {SEED}.",
        "",
        "- **CE only**: next-token cross-entropy, no teacher (`selkd-train --kd-weight 0 --ce-weight 1 --select "
        "none` over the full cache's training split, in the same batch order as the cache-based runs).",
        "- **full KD, teacher online**: forward KL to the teacher's exact distribution at every position, the "
        "teacher running in the loop.",
        f"- **full KD from the cache**: forward KL to RS-KD sampled targets ({CLASSES}) at every position.",
        f"- **SE-KD**: the same targets, only at the {float(SELECT.split(':')[1]):.0%} of positions per sequence "
        "with the highest student entropy (recomputed every step), no CE term.",
        f"- **SE-KD 3X**: SE-KD on a cache that holds only the top {SAMPLE_RATIO:.0%} of training sequences by the "
        "frozen base student's mean entropy (positions + classes + samples).",
    ]

"""Benchmark 5: distillation quality on the demo corpus, over seeds.

Every run continues the demo's base student for the demo's number of steps, batch and learning rate
on the demo's KD corpus; only the method and the seed (data order, random selection, sampled
classes) change, so differences are the method's. Every final student is scored on the same held-out
sequences: CE (and perplexity), next-token accuracy, top-1 agreement with the teacher, KL(teacher ||
student) and the expected calibration error (ECE, 15 bins) of its top-1 confidence.

Groups (``--groups``):
  signals  KD on 20% of positions chosen by each of the trainer's 8 signals (random among them), full
           KD (no selection), SE-KD plus CE, and CE only; on a ``full`` cache (the teacher's whole
           distribution in float16), so that the targets are exact and every signal is defined
  budgets  student entropy at 1, 5, 10, 20, 50 and 100% of positions (100% is full KD), same cache
  classes  full KD and SE-KD 20% with each class mode: full, topk:64 with the tail bucket, topk:64
           renormalised (biased) and sample:50 (the demo's cache)
  lr       full KD, SE-KD 20%, random 20% and SE-KD 20% + CE at 3x lower and 3x higher peak learning
           rates than the demo's (full targets)

The CE-only runs read the ``topk:64`` cache for their batches (any of the caches gives the same
sequences in the same order; the targets are unused).

Needs a finished demo (its teacher, base student, corpus and ``sample:50`` cache)::

    selkd-demo --out DEMO
    python tools/bench_quality.py --demo DEMO --out OUT [--seeds 0 1] [--jobs 2] [--plots docs/img]

Prints markdown tables with the machine and the command, writes them to OUT/quality.md and every
number to OUT/quality.json. Resumable: a run whose OUT/runs/KEY/quality.json matches its settings is
reused, so an interrupted benchmark continues where it stopped. The settings are the run's config, the
demo's models and the scoring version, not selkd's code: after changing the trainer, delete the
affected OUT/runs/KEY directories (or all of OUT/runs) so that they are trained again.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selkd.trainer.selection import SIGNALS as SELECTION_SIGNALS

BUILDS = {"topk64": "topk:64", "full": "full"}  # caches this benchmark builds (sample50: the demo's)
SE = "student-entropy"
SIGNALS = tuple(SELECTION_SIGNALS)  # every signal the trainer has
BUDGETS = (0.01, 0.05, 0.1, 0.2, 0.5)  # and 1.0: full KD
GROUPS = ("signals", "budgets", "classes", "lr")
LR_FACTORS = (1 / 3, 3.0)  # the lr group: these multiples of the demo's learning rate
ECE_BINS = 15
SCORING = 2  # version of score(): records scored by another version are redone
METRICS = ("ce", "ppl", "acc", "agree", "kl", "ece", "overconfidence", "entropy")


@dataclass(frozen=True)
class Method:
    """One compared way of continuing the base student (seed apart)."""

    key: str
    label: str
    source: str  # a cache: "full", "topk64" or "sample50"
    select: str = "none"
    renormalize: bool = False
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    lr_factor: float = 1.0  # times the demo's peak learning rate
    groups: tuple[str, ...] = ()


def _sel(fraction: float, signal: str = SE) -> str:
    return "none" if fraction >= 1.0 else f"{signal}:{fraction:g}"


def methods() -> list[Method]:
    out = [
        Method("ce-only", "CE only (no teacher)", "topk64", kd_weight=0.0, ce_weight=1.0, groups=GROUPS),
        Method("kd-full", "full KD (all positions)", "full", groups=GROUPS),
        Method(
            "se-ce",
            "student entropy 20% + CE on all positions (weight 1)",
            "full",
            _sel(0.2),
            ce_weight=1.0,
            groups=("signals",),
        ),
    ]
    for signal in SIGNALS:
        groups = GROUPS if signal == SE else ("signals",)
        out.append(Method(f"sel-{signal}-0.2", f"{signal} 20%", "full", _sel(0.2, signal), groups=groups))
    for fraction in BUDGETS:
        if fraction != 0.2:
            out.append(
                Method(f"sel-{SE}-{fraction:g}", f"{SE} {fraction:.0%}", "full", _sel(fraction), groups=("budgets",))
            )
    for fraction in (1.0, 0.2):
        tag = f"{fraction:g}"
        out += [
            Method(f"topk64-{tag}", "topk:64 with tail", "topk64", _sel(fraction), groups=("classes",)),
            Method(
                f"renorm-{tag}", "topk:64 renormalised", "topk64", _sel(fraction), renormalize=True, groups=("classes",)
            ),
            Method(f"sample50-{tag}", "sample:50", "sample50", _sel(fraction), groups=("classes",)),
        ]
    for factor in LR_FACTORS:
        for base in ("kd-full", f"sel-{SE}-0.2", "sel-random-0.2", "se-ce"):
            m = next(m for m in out if m.key == base)
            key = f"{base}-lr{factor:.3g}"
            out.append(dataclasses.replace(m, key=key, lr_factor=factor, groups=("lr",)))
    return out


# ----------------------------------------------------------------------------- scoring


def log_softmax_rows(model: torch.nn.Module, seqs: list[np.ndarray]) -> list[torch.Tensor]:
    """Per sequence, the model's log-probs [L-1, V] of every next token (fp32)."""
    model.eval()
    out = []
    with torch.no_grad():
        for s in seqs:
            x = torch.from_numpy(s.astype(np.int64))[None]
            out.append(torch.log_softmax(model(input_ids=x, use_cache=False).logits[0, :-1].float(), -1))
    return out


def score(logq: list[torch.Tensor], seqs: list[np.ndarray], logp: list[torch.Tensor]) -> dict[str, float]:
    """Held-out metrics of a student's log-probs ``logq`` against the next tokens and the teacher's ``logp``."""
    nll, correct, agree, kl, conf, ent = [], [], [], [], [], []
    for q, s, p in zip(logq, seqs, logp, strict=True):
        y = torch.from_numpy(s[1:].astype(np.int64))
        nll.append(-q.gather(-1, y[:, None])[:, 0])
        top_conf, top = q.max(-1)
        correct.append((top == y).float())
        agree.append((top == p.argmax(-1)).float())
        kl.append((p.exp() * (p - q)).sum(-1))
        conf.append(top_conf.exp())
        ent.append(-(q.exp() * q).sum(-1))
    nll_t, correct_t, conf_t = torch.cat(nll), torch.cat(correct), torch.cat(conf)
    bins = torch.clamp((conf_t * ECE_BINS).long(), max=ECE_BINS - 1)
    ece = 0.0
    for b in range(ECE_BINS):
        m = bins == b
        if m.any():
            ece += float(m.float().mean()) * abs(float(correct_t[m].mean()) - float(conf_t[m].mean()))
    ce = float(nll_t.mean())
    return {
        "ce": ce,
        "ppl": math.exp(min(ce, 50.0)),
        "acc": float(correct_t.mean()),
        "agree": float(torch.cat(agree).mean()),
        "kl": float(torch.cat(kl).mean()),
        "ece": ece,
        "overconfidence": float(conf_t.mean()) - float(correct_t.mean()),  # < 0: underconfident
        "entropy": float(torch.cat(ent).mean()),
    }


# ----------------------------------------------------------------------------- one run (worker process)

_WORKER: dict[str, Any] = {}


def _worker_init(threads: int) -> None:
    import transformers

    torch.set_num_threads(threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _eval_context(ctx: dict[str, Any]) -> tuple[list[np.ndarray], list[torch.Tensor]]:
    """The held-out sequences and the teacher's log-probs on them, once per worker process."""
    if "eval" not in _WORKER:
        from selkd.cache.reader import open_cache
        from selkd.cache.teacher import load_causal_lm

        seqs = [np.asarray(s.input_ids) for s in open_cache(ctx["caches"]["topk64"]).eval_sequences()]
        teacher = load_causal_lm(ctx["teacher"], "cpu", torch.float32)
        _WORKER["eval"] = (seqs, log_softmax_rows(teacher, seqs))
    return _WORKER["eval"]


def train_config(method: Method, seed: int, out: Path, ctx: dict[str, Any]) -> Any:
    from selkd.trainer.config import TrainConfig

    return TrainConfig(
        cache=ctx["caches"][method.source],
        out=str(out),
        student=ctx["base"],
        steps=ctx["steps"],
        batch_size=ctx["batch"],
        lr=ctx["lr"] * method.lr_factor,
        warmup_steps=ctx["warmup_steps"],
        seed=seed,
        select=method.select,
        topk_renormalize=method.renormalize,
        kd_weight=method.kd_weight,
        ce_weight=method.ce_weight,
        device="cpu",
        num_workers=0,
        eval_every=0,
        log_every=max(1, ctx["steps"] // 25),
        save_every=0,
        progress=False,
    )


def run_one(method: Method, seed: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """Train one (method, seed), score its final student; returns the record (also written to disk)."""
    from selkd.cache.teacher import load_causal_lm
    from selkd.trainer.loop import train

    out = Path(ctx["out"]) / "runs" / f"{method.key}-s{seed}"
    cfg = train_config(method, seed, out, ctx)
    identity = {"cfg": cfg.to_dict(), "demo": ctx["identity"], "scoring": SCORING}
    stamp = out / "quality.json"
    if stamp.is_file():
        record = json.loads(stamp.read_text())
        if record.get("identity") == identity:
            return {**record, "reused": True}
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    seqs, logp = _eval_context(ctx)
    metrics = score(log_softmax_rows(load_causal_lm(str(out / "final"), "cpu", torch.float32), seqs), seqs, logp)
    record = {
        "identity": identity,
        "method": method.key,
        "seed": seed,
        "steps": result["step"],
        "wall_s": wall,
        **metrics,
    }
    tmp = stamp.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(stamp)
    shutil.rmtree(out / "final")  # 2.5 MB a run; the record is what the tables need
    return {**record, "reused": False}


# ----------------------------------------------------------------------------- setup


def demo_context(demo: Path, out: Path) -> dict[str, Any]:
    """What the runs share, read from the demo's results.json."""
    path = demo / "results.json"
    if not path.is_file():
        raise SystemExit(f"bench_quality: {path} not found; run `selkd-demo --out {demo}` first")
    results = json.loads(path.read_text())
    s, b = results["settings"], results["settings"]["budget"]
    missing = [k for k in ("teacher_dir", "base_dir", "kd_data") if k not in s]
    if missing:
        raise SystemExit(f"bench_quality: {path} lacks {', '.join(missing)}: rerun `selkd-demo --out {demo}` (seconds)")
    sample50 = demo / "caches" / "full"
    return {
        "demo": str(demo),
        "out": str(out),
        "teacher": s["teacher_dir"],
        "base": s["base_dir"],
        "kd_data": s["kd_data"],
        "seq_len": b["seq_len"],
        "steps": b["kd_steps"],
        "batch": b["kd_batch"],
        "lr": b["kd_lr"],
        "warmup_steps": b["warmup_steps"],
        "cache_batch": b["cache_batch"],
        "eval_fraction": s["eval_fraction"],
        "split_seed": s["seed"],
        "caches": {"sample50": str(sample50), **{name: str(out / "caches" / name) for name in BUILDS}},
        "demo_rows": {r["key"]: r for r in results["rows"]},
        "identity": hashlib.sha256(
            json.dumps([s["teacher_dir"], s["base_dir"], s["caches"]], sort_keys=True).encode()
        ).hexdigest()[:16],
    }


def ensure_cache(ctx: dict[str, Any], name: str) -> float | None:
    """Build cache ``name`` of :data:`BUILDS` with the demo's sample:50 build settings (same sequences
    and split); returns the build seconds, or None when an earlier build is complete."""
    from selkd.cache.build import build_cache
    from selkd.cache.config import BuildConfig
    from selkd.cache.reader import CacheError, open_cache

    path = Path(ctx["caches"][name])
    try:
        if open_cache(str(path)).summary is not None:
            return None
    except (CacheError, OSError, ValueError):
        pass  # absent or unfinished: the build resumes it
    cfg = BuildConfig(
        teacher=ctx["teacher"],
        data=[ctx["kd_data"]],
        out=str(path),
        classes=BUILDS[name],
        max_seq_len=ctx["seq_len"],
        eval_fraction=ctx["eval_fraction"],
        seed=ctx["split_seed"],
        device="cpu",
        batch_size=ctx["cache_batch"],
        progress=False,
    )
    t0 = time.perf_counter()
    build_cache(cfg)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- tables and plots


def topk_coverage(url: str) -> dict[str, float]:
    """On the held-out sequences of a topk cache: the teacher's mean tail mass (what the k classes miss)
    and how often the true next token is not among the k classes."""
    from selkd.cache.reader import open_cache

    tail, outside = [], []
    for s in open_cache(url).eval_sequences():
        n = len(s.input_ids) - 1
        ids = np.asarray(s.targets.ids)[:n]
        tail.append(np.exp(np.asarray(s.targets.tail_logmass, dtype=np.float64)[:n]))
        outside.append(~(ids == np.asarray(s.input_ids)[1:, None]).any(-1))
    return {"tail_mass": float(np.concatenate(tail).mean()), "label_outside": float(np.concatenate(outside).mean())}


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: the mean of each metric over seeds, and the per-seed CE values."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by.setdefault(r["method"], []).append(r)
    out = {}
    for key, rs in by.items():
        rs.sort(key=lambda r: r["seed"])
        out[key] = {m: statistics.fmean(r[m] for r in rs) for m in METRICS}
        out[key]["ce_seeds"] = [r["ce"] for r in rs]
        out[key]["seeds"] = [r["seed"] for r in rs]
    return out


def _row(label: str, s: dict[str, Any], ref: float | None) -> str:
    seeds = " / ".join(f"{c:.3f}" for c in s["ce_seeds"])
    delta = "—" if ref is None else f"{s['ce'] - ref:+.3f}"
    return (
        f"| {label} | {s['ce']:.3f} | {seeds} | {delta} | {s['ppl']:.1f} | {s['acc']:.3f} | {s['agree']:.3f} | "
        f"{s['kl']:.3f} | {s['ece']:.3f} | {s['overconfidence']:+.3f} | {s['entropy']:.2f} |"
    )


HEADER = (
    "| method | held-out CE (mean) | CE per seed | vs full KD | PPL | next-token acc | top-1 agree "
    "| KL(teacher‖student) | ECE | confidence − acc | entropy |\n"
    "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def tables(summary: dict[str, dict[str, Any]], refs: dict[str, dict[str, float]], groups: list[str]) -> str:
    by_key = {m.key: m for m in methods()}
    full = summary.get("kd-full", {}).get("ce")
    ref_rows = [
        f"| {name} | {r['ce']:.3f} | (fixed) | — | {r['ppl']:.1f} | {r['acc']:.3f} | "
        f"{'—' if r['agree'] is None else format(r['agree'], '.3f')} | {r['kl']:.3f} | {r['ece']:.3f} | "
        f"{r['overconfidence']:+.3f} | {r['entropy']:.2f} |"
        for name, r in refs.items()
    ]
    parts = []

    def table(title: str, keys: list[tuple[str, str]]) -> None:
        lines = [f"#### {title}\n", HEADER, *ref_rows]
        lines += [_row(label, summary[k], full) for k, label in keys if k in summary]
        parts.append("\n".join(lines) + "\n")

    if "signals" in groups:
        keys = [("ce-only", "CE only (no teacher)"), ("kd-full", "none: full KD (100%)")]
        keys += [(f"sel-{s}-0.2", f"{s} 20%") for s in SIGNALS]
        keys += [("se-ce", by_key["se-ce"].label)]
        table("Signals at 20% of positions (full targets)", keys)
    if "budgets" in groups:
        keys = [("ce-only", "CE only (0%, no teacher)")]
        keys += [(f"sel-{SE}-{f:g}", f"student entropy {f:.0%}") for f in BUDGETS]
        keys += [("kd-full", "student entropy 100% (= full KD)")]
        table("Budget sweep: student entropy, per-sequence top k% (full targets)", keys)
    if "classes" in groups:
        keys = []
        for fraction, pos in ((1.0, "full KD"), (0.2, "SE-KD 20%")):
            tag = f"{fraction:g}"
            exact = "kd-full" if fraction == 1.0 else f"sel-{SE}-0.2"
            keys += [
                (exact, f"{pos}, full"),
                (f"topk64-{tag}", f"{pos}, topk:64 with tail"),
                (f"renorm-{tag}", f"{pos}, topk:64 renormalised"),
                (f"sample50-{tag}", f"{pos}, sample:50"),
            ]
        table("Class modes", keys)
    if "lr" in groups:
        keys = []
        for base, name in (("kd-full", "full KD"), (f"sel-{SE}-0.2", "SE-KD 20%"), ("sel-random-0.2", "random 20%")):
            keys += [
                (f"{base}-lr{f:.3g}" if f != 1 else base, f"{name}, lr x{f:.3g}")
                for f in (LR_FACTORS[0], 1, LR_FACTORS[1])
            ]
        keys += [
            (f"se-ce-lr{f:.3g}" if f != 1 else "se-ce", f"SE-KD 20% + CE, lr x{f:.3g}")
            for f in (LR_FACTORS[0], 1, LR_FACTORS[1])
        ]
        table("Learning rate (full targets; x1 is the demo's peak lr)", keys)
    return "\n".join(parts)


def plots(summary: dict[str, dict[str, Any]], refs: dict[str, dict[str, float]], where: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    where.mkdir(parents=True, exist_ok=True)
    made = []

    def ref_lines(ax: Any, vertical: bool = False) -> None:
        line = ax.axvline if vertical else ax.axhline
        for key, label, style in (("kd-full", "full KD", "--"), ("ce-only", "CE only", ":")):
            if key in summary:
                line(summary[key]["ce"], color="grey", linestyle=style, label=label)
        line(refs["base student"]["ce"], color="black", linestyle="-.", label="base student")

    def save(fig: Any, ax: Any, name: str, title: str) -> None:
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        made.append(where / name)
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)

    budget_keys = [(f, f"sel-{SE}-{f:g}" if f < 1 else "kd-full") for f in (*BUDGETS, 1.0)]
    budget_keys = [(f, k) for f, k in budget_keys if k in summary]
    if budget_keys:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        xs = [f * 100 for f, _ in budget_keys]
        ax.plot(xs, [summary[k]["ce"] for _, k in budget_keys], "o-", label="student entropy (mean)")
        for f, k in budget_keys:
            ax.scatter([f * 100] * len(summary[k]["ce_seeds"]), summary[k]["ce_seeds"], color="C0", alpha=0.4, s=12)
        ref_lines(ax)
        ax.set_xscale("log")
        ax.set_xlabel("positions distilled per sequence (%)")
        ax.set_ylabel("held-out CE (nats)")
        # the student's mean predictive entropy on the held-out positions: selection bias shows here
        ax2.plot(xs, [summary[k]["entropy"] for _, k in budget_keys], "o-", color="C2", label="student")
        for name, style in (("teacher", "--"), ("base student", "-.")):
            ax2.axhline(refs[name]["entropy"], color="black", linestyle=style, label=name)
        ax2.set_xscale("log")
        ax2.set_xlabel("positions distilled per sequence (%)")
        ax2.set_ylabel("mean entropy on held-out positions (nats)")
        ax2.legend(fontsize=8)
        save(fig, ax, "quality-budgets.png", "Budget sweep (demo corpus)")

    signal_keys = [k for k in (*(f"sel-{s}-0.2" for s in SIGNALS), "se-ce") if k in summary]
    if signal_keys:
        fig, ax = plt.subplots(figsize=(6, 4))
        ys = range(len(signal_keys))
        ax.barh(list(ys), [summary[k]["ce"] for k in signal_keys], color="C1", alpha=0.7)
        for y, k in zip(ys, signal_keys, strict=True):
            ax.scatter(summary[k]["ce_seeds"], [y] * len(summary[k]["ce_seeds"]), color="black", s=10)
        names = {"se-ce": "student-entropy\n+ CE (all positions)"}
        ax.set_yticks(list(ys), [names.get(k, k.removeprefix("sel-").removesuffix("-0.2")) for k in signal_keys])
        ref_lines(ax, vertical=True)
        lo = min(min(summary[k]["ce_seeds"]) for k in signal_keys + ["kd-full"] if k in summary)
        hi = max(max(summary[k]["ce_seeds"]) for k in signal_keys)
        ax.set_xlim(lo - 0.1, hi + 0.05)
        ax.set_xlabel("held-out CE (nats), 20% of positions")
        save(fig, ax, "quality-signals.png", "Position-selection signals (demo corpus)")

    modes = [("full", "kd-full", f"sel-{SE}-0.2"), ("topk:64 + tail", "topk64-1", "topk64-0.2")]
    modes += [("topk:64 renorm", "renorm-1", "renorm-0.2"), ("sample:50", "sample50-1", "sample50-0.2")]
    modes = [m for m in modes if m[1] in summary and m[2] in summary]
    if modes:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
        x = np.arange(len(modes))
        panels = (
            (axes[0], "ce", "held-out CE (nats)"),
            (axes[1], "entropy", "mean entropy on held-out positions (nats)"),
        )
        for ax, metric, title in panels:
            ax.bar(x - 0.2, [summary[m[1]][metric] for m in modes], 0.4, label="all positions")
            ax.bar(x + 0.2, [summary[m[2]][metric] for m in modes], 0.4, label="SE-KD 20%")
            ax.set_xticks(x, [m[0] for m in modes], fontsize=8)
            ax.set_title(title)
            vals = [summary[k][metric] for m in modes for k in m[1:]]
            if metric == "entropy":
                ax.axhline(refs["teacher"]["entropy"], color="black", linestyle="--", label="teacher")
                vals.append(refs["teacher"]["entropy"])
            ax.set_ylim(min(vals) - 0.1, max(vals) + 0.05)
            ax.legend(fontsize=8)
        fig.suptitle("Class modes (demo corpus)")
        fig.tight_layout()
        made.append(where / "quality-classes.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    return made


# ----------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", required=True, type=Path, help="output directory of a finished `selkd-demo` run")
    p.add_argument("--out", required=True, type=Path, help="where the topk:64 cache, runs and tables go")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (default: 0 1)")
    p.add_argument("--groups", nargs="+", choices=GROUPS, default=list(GROUPS), help="which ablations (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once, one torch thread each (default: 2)")
    p.add_argument("--plots", type=Path, help="directory for the PNG plots (default: OUT)")
    args = p.parse_args()
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    t_start = time.perf_counter()
    ctx = demo_context(args.demo.resolve(), args.out.resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, args.jobs))
    _worker_init(max(1, args.jobs))
    for name in BUILDS:
        build_s = ensure_cache(ctx, name)
        if build_s is not None:
            print(f"built {ctx['caches'][name]} in {build_s:.0f} s", flush=True)

    todo = [(m, s) for m in methods() if set(m.groups) & set(args.groups) for s in args.seeds]
    records = []
    with ProcessPoolExecutor(
        args.jobs, mp_context=get_context("spawn"), initializer=_worker_init, initargs=(1,)
    ) as pool:
        futures = {pool.submit(run_one, m, s, ctx): (m, s) for m, s in todo}
        for i, fut in enumerate(as_completed(futures), 1):
            m, s = futures[fut]
            r = fut.result()
            records.append(r)
            how = "reused" if r["reused"] else f"{r['wall_s']:.0f} s"
            print(f"[{i}/{len(todo)}] {m.key} seed {s}: CE {r['ce']:.3f}, ECE {r['ece']:.3f} ({how})", flush=True)

    # the fixed references: the teacher and the base student, scored the same way
    from selkd.cache.teacher import load_causal_lm
    from selkd.trainer.demo.machine import machine_info

    seqs, logp = _eval_context(ctx)
    refs = {}
    for name, path in (("teacher", ctx["teacher"]), ("base student", ctx["base"])):
        m = score(log_softmax_rows(load_causal_lm(path, "cpu", torch.float32), seqs), seqs, logp)
        refs[name] = {**m, "agree": None if name == "teacher" else m["agree"]}
    summary = summarize(records)
    made = plots(summary, refs, args.plots or args.out)

    machine = machine_info(1)
    n_pos = sum(len(s) - 1 for s in seqs)
    head = [
        "### Quality on the demo corpus\n",
        f"machine: {machine['cpu']} ({machine['cores']} cores), 1 torch thread per run, {args.jobs} runs at once; "
        f"python {machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}",
        f"command: `python {' '.join(sys.argv)}` (demo: `selkd-demo --out {args.demo}`)",
        f"every run: the demo's base student + {ctx['steps']} steps of {ctx['batch']} x {ctx['seq_len']} tokens, "
        f"lr {ctx['lr']:g} (AdamW, {ctx['warmup_steps']} warm-up steps, cosine), "
        f"seeds {' '.join(map(str, args.seeds))}; "
        f"scored on {len(seqs)} held-out sequences ({n_pos:,} positions); wall {time.perf_counter() - t_start:.0f} s",
    ]
    if "classes" in args.groups:
        cov = topk_coverage(ctx["caches"]["topk64"])
        head.append(
            f"topk:64 on the held-out sequences: the teacher's mass outside its top 64 is {cov['tail_mass']:.1%} "
            f"on average; the true next token is outside them at {cov['label_outside']:.1%} of positions"
        )
    head[-1] += "\n"
    text = "\n".join(head) + "\n" + tables(summary, refs, args.groups)
    text += "".join(f"\n![{p.stem}]({p})\n" for p in made)
    print("\n" + text)
    (args.out / "quality.md").write_text(text)
    (args.out / "quality.json").write_text(
        json.dumps({"refs": refs, "summary": summary, "records": records, "ctx": ctx}, indent=1, default=str)
    )


if __name__ == "__main__":
    main()

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
  regimes  the regime map: 2 base students (A: the demo's; B: A continued with CE until its held-out CE
           plateaus) x 2 teachers (A: the demo's teacher trained on; B: teacher A trained on 2.6 times as
           many more steps), each with its own ``full`` cache; per regime CE only, full KD, SE-KD 20% (top-k),
           random 20%, SE-KD 20% stochastic (Hansen-Hurwitz weights), student entropy 15% + random 5%, SE-KD
           20% + CE on all positions, SE-KD 20% curriculum (top-k from half-way) and global (GLS), at equal
           steps and (every selection method but curriculum and global) at equal wall time: the steps its
           cheaper step buys against full KD's, from a timing pass of short runs interleaved in one process

The CE-only runs read the ``topk:64`` cache for their batches, the regimes' the demo's one (any of the
caches gives the same sequences in the same order; the targets are unused).

Needs a finished demo (its teacher, base student, corpus and ``sample:50`` cache)::

    selkd-demo --out DEMO
    python tools/bench_quality.py --demo DEMO --out OUT [--seeds 0 1] [--jobs 2] [--plots docs/img]

Prints markdown tables with the machine and the command, writes them to OUT/quality.md and every
number to OUT/quality.json. Resumable: a run whose OUT/runs/KEY/quality.json matches its settings is
reused, so an interrupted benchmark continues where it stopped (the regimes' extra models, caches and
step timings are kept under OUT too). The settings are the run's config, the
demo's models and the scoring version, not selkd's code: after changing the trainer, delete the
affected OUT/runs/KEY directories (or all of OUT/runs) so that they are trained again.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from selkd.trainer.demo.models import ce_step
from selkd.trainer.demo.util import digest
from selkd.trainer.selection import SIGNALS as SELECTION_SIGNALS

# caches this benchmark builds (sample50: the demo's): name -> (classes, teacher); teacher B's only for regimes
BUILDS = {"topk64": ("topk:64", "demo"), "full": ("full", "demo"), "full-tA": ("full", "A"), "full-tB": ("full", "B")}
SE = "student-entropy"
SIGNALS = tuple(SELECTION_SIGNALS)  # every signal the trainer has
BUDGETS = (0.01, 0.05, 0.1, 0.2, 0.5)  # and 1.0: full KD
ABLATIONS = ("signals", "budgets", "classes", "lr")  # the groups on the demo's base student and teacher
GROUPS = (*ABLATIONS, "regimes")
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
    policy: str = "sequence"  # --select-policy
    importance_weights: bool = True
    base: str = "A"  # base student: A (the demo's) or B (A at its CE plateau)
    teacher: str = "A"  # whose cache (the source's teacher); the held-out KL and agreement use it too
    equal_time: bool = False  # trains the steps its step cost buys against full KD's (see equal_time_steps)
    cost_of: str = ""  # the method whose timed step cost this one has (the same method in regime A/A)


def _sel(fraction: float, signal: str = SE) -> str:
    return "none" if fraction >= 1.0 else f"{signal}:{fraction:g}"


def methods() -> list[Method]:
    out = [
        Method("ce-only", "CE only (no teacher)", "topk64", kd_weight=0.0, ce_weight=1.0, groups=ABLATIONS),
        Method("kd-full", "full KD (all positions)", "full", groups=ABLATIONS),
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
        groups = ABLATIONS if signal == SE else ("signals",)
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
    return out + regime_methods()


REGIMES = (("A", "A"), ("A", "B"), ("B", "A"), ("B", "B"))  # (base student, teacher)
# the regimes group's methods, one regime apart: (key, label, select, policy, importance weights, ce weight)
REGIME_METHODS = (
    ("kd-full", "full KD", "none", "sequence", True, 0.0),
    ("se", "SE-KD 20% (top-k)", _sel(0.2), "sequence", True, 0.0),
    ("random", "random 20%", _sel(0.2, "random"), "sequence", True, 0.0),
    ("se-stoch", "SE-KD 20% stochastic (HH weights)", _sel(0.2), "stochastic", True, 0.0),
    ("se-hybrid", "SE 15% + random 5%", f"{SE}:0.15+random:0.05", "sequence", True, 0.0),
    ("se-ce", "SE-KD 20% + CE on all", _sel(0.2), "sequence", True, 1.0),
    ("se-curr", "SE-KD 20% curriculum", _sel(0.2), "curriculum", True, 0.0),
    ("se-global", "SE-KD 20% global (GLS)", _sel(0.2), "global", True, 0.0),
)
NO_EQUAL_TIME = ("se-curr", "se-global")  # the paper's policy variants: equal steps only (their step costs SE-KD's)


def has_equal_time(name: str, select: str) -> bool:
    """Whether regime method ``name`` (of :data:`REGIME_METHODS`) also runs at equal wall time: every
    selecting one but :data:`NO_EQUAL_TIME`."""
    return select != "none" and name not in NO_EQUAL_TIME


# the order the regimes' runs are trained in, tier by tier (each tier seed by seed): (method, equal time)
RUN_TIERS = (
    {("kd-full", False), ("se", False), ("random", False), ("", False)},  # "": CE only
    {("se", True), ("random", True)},
    {("se-ce", False), ("se-hybrid", False)},
    {("se-stoch", False)},
    {("se-ce", True), ("se-hybrid", True)},
    {("se-stoch", True)},
    {("se-curr", False), ("se-global", False)},
)


def run_tier(m: Method) -> int:
    """Which of :data:`RUN_TIERS` trains ``m`` (the other groups' methods: the first)."""
    return next(i for i, tier in enumerate(RUN_TIERS) if (m.cost_of, m.equal_time) in tier or not m.cost_of)


# the entropy-selected ones the reading asks about
ENTROPY_METHODS = ("se", "se-stoch", "se-hybrid", "se-ce", "se-curr", "se-global")


def regime_key(base: str, teacher: str) -> str:
    return f"b{base}t{teacher}"


def regime_methods() -> list[Method]:
    """Per regime: CE only (one per base student: it never reads a teacher, so both teachers share it),
    then every method of :data:`REGIME_METHODS` at equal steps and, when it selects, at equal wall time."""
    out = [
        Method(
            f"rg-b{base}-ce-only", "CE only", "sample50", kd_weight=0.0, ce_weight=1.0, groups=("regimes",), base=base
        )
        for base in ("A", "B")
    ]
    for base, teacher in REGIMES:
        source = f"full-t{teacher}"
        for name, label, select, policy, weights, ce in REGIME_METHODS:
            m = Method(
                f"rg-{regime_key(base, teacher)}-{name}",
                label,
                source,
                select,
                ce_weight=ce,
                groups=("regimes",),
                policy=policy,
                importance_weights=weights,
                base=base,
                teacher=teacher,
                cost_of=name,
            )
            out.append(m)
            if has_equal_time(name, select):
                out.append(dataclasses.replace(m, key=f"{m.key}-eqt", equal_time=True))
    return out


def equal_time_steps(steps: int, full_step_s: float, step_s: float) -> int:
    """Steps a method whose step takes ``step_s`` trains in the time full KD takes for ``steps`` steps of
    ``full_step_s`` (at least one)."""
    if full_step_s <= 0 or step_s <= 0:
        raise ValueError(f"step times must be positive, got {full_step_s} and {step_s}")
    return max(1, round(steps * full_step_s / step_s))


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


def _eval_context(ctx: dict[str, Any], teacher: str = "demo") -> tuple[list[np.ndarray], list[torch.Tensor]]:
    """The held-out sequences and teacher ``teacher``'s log-probs on them, once per worker process."""
    if ("eval", teacher) not in _WORKER:
        from selkd.cache.reader import open_cache
        from selkd.cache.teacher import load_causal_lm

        seqs = [np.asarray(s.input_ids) for s in open_cache(ctx["caches"]["sample50"]).eval_sequences()]
        model = load_causal_lm(ctx["teachers"][teacher], "cpu", torch.float32)
        _WORKER["eval", teacher] = (seqs, log_softmax_rows(model, seqs))
    return _WORKER["eval", teacher]


def train_config(method: Method, seed: int, out: Path, ctx: dict[str, Any]) -> Any:
    from selkd.trainer.config import TrainConfig

    steps = ctx["run_steps"].get(method.key, ctx["steps"])
    return TrainConfig(
        cache=ctx["caches"][method.source],
        out=str(out),
        student=ctx["bases"][method.base],
        steps=steps,
        batch_size=ctx["batch"],
        lr=ctx["lr"] * method.lr_factor,
        warmup_steps=ctx["warmup_steps"],
        seed=seed,
        select=method.select,
        select_policy=method.policy,
        **({"curriculum_steps": max(1, steps // 2)} if method.policy == "curriculum" else {}),  # top-k from half-way
        importance_weights=method.importance_weights,
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


def finished(method: Method, seed: int, ctx: dict[str, Any]) -> tuple[Any, dict[str, Any], dict[str, Any] | None]:
    """The run's config, its identity and, when an earlier run with that identity finished, its record."""
    out = Path(ctx["out"]) / "runs" / f"{method.key}-s{seed}"
    cfg = train_config(method, seed, out, ctx)
    identity = {"cfg": cfg.to_dict(), "demo": ctx["identity"], "scoring": SCORING}
    if "regimes" in method.groups:  # the extra models are retrained when their settings change
        identity["models"] = [ctx["model_ids"][f"base-{method.base}"], ctx["model_ids"][f"teacher-{method.teacher}"]]
    stamp = out / "quality.json"
    if stamp.is_file() and (record := json.loads(stamp.read_text())).get("identity") == identity:
        return cfg, identity, {**record, "reused": True}
    return cfg, identity, None


def run_one(method: Method, seed: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """Train one (method, seed), score its final student; returns the record (also written to disk)."""
    from selkd.cache.teacher import load_causal_lm
    from selkd.trainer.loop import train

    cfg, identity, record = finished(method, seed, ctx)
    if record is not None:
        return record
    out, stamp = Path(cfg.out), Path(cfg.out) / "quality.json"
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    seqs, logp = _eval_context(ctx, method.teacher)
    metrics = score(log_softmax_rows(load_causal_lm(str(out / "final"), "cpu", torch.float32), seqs), seqs, logp)
    record = {
        "identity": identity,
        "method": method.key,
        "seed": seed,
        "steps": result["step"],
        "wall_s": wall,
        "step_s": median_step_s(out / "metrics.jsonl"),
        **metrics,
    }
    tmp = stamp.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(stamp)
    shutil.rmtree(out / "final")  # 2.5 MB a run; the record is what the tables need
    return {**record, "reused": False}


def median_step_s(metrics: Path, skip: int = 2) -> float | None:
    """The median of a run's logged step times (``metrics.jsonl`` windows ending after step ``skip``):
    robust to a pause of the process (a SIGSTOP) spoiling a few windows, unlike the run's wall time."""
    times = [
        row["step_time_s"]
        for row in map(json.loads, metrics.read_text().splitlines())
        if "step_time_s" in row and row["step"] > skip
    ]
    return statistics.median(times) if times else None


# ----------------------------------------------------------------------------- setup


def demo_context(demo: Path, out: Path, extra_models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What the runs share, read from the demo's results.json; ``extra_models``: the regimes' extra
    models' settings (:data:`EXTRA_MODELS`, as the command line set them)."""
    path = demo / "results.json"
    if not path.is_file():
        raise SystemExit(f"bench_quality: {path} not found; run `selkd-demo --out {demo}` first")
    results = json.loads(path.read_text())
    s, b = results["settings"], results["settings"]["budget"]
    missing = [k for k in ("teacher_dir", "base_dir", "kd_data") if k not in s]
    if missing:
        raise SystemExit(f"bench_quality: {path} lacks {', '.join(missing)}: rerun `selkd-demo --out {demo}` (seconds)")
    sample50 = demo / "caches" / "full"
    identity = digest([s["teacher_dir"], s["base_dir"], s["caches"]], 16)
    return {
        "demo": str(demo),
        "out": str(out),
        "teachers": {"demo": s["teacher_dir"], **{t: str(out / "models" / f"teacher-{t}") for t in "AB"}},
        "bases": {"A": s["base_dir"], "B": str(out / "models" / "base-B")},
        "model_ids": model_ids(extra_models, identity),
        "extra_models": extra_models,
        "pretrain_batch": b["pretrain_batch"],
        "extra_data": str(Path(s["kd_data"]).with_name("extra.jsonl")),
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
        "identity": identity,
        "run_steps": {},  # method key -> steps, for the equal-time runs (set once the step costs are known)
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
    classes, teacher = BUILDS[name]
    cfg = BuildConfig(
        teacher=ctx["teachers"][teacher],
        data=[ctx["kd_data"]],
        out=str(path),
        classes=classes,
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


# ----------------------------------------------------------------------------- the regimes' extra models

# teacher A: the demo's teacher trained on for `steps` more steps of CE, the lr a cosine from `lr` (the demo's
# teacher lr) to lr/10 (on a busy machine the demo's time-budgeted teacher can end no better than its base
# student); teacher B: teacher A trained on the same way (`from` names another extra model of the same kind:
# it is trained first, in the same process); base B: base A trained on with CE at a constant lr, scored on the
# held-out sequences every `every` steps, until `every` steps gain less than `delta` nats (or `max_steps`)
EXTRA_MODELS = {
    "teacher-A": {"kind": "teacher", "from": "demo", "steps": 500, "lr": 3e-3, "seed": 11},
    "teacher-B": {"kind": "teacher", "from": "A", "steps": 1300, "lr": 3e-3, "seed": 12},
    "base-B": {"kind": "base", "from": "A", "every": 100, "delta": 0.01, "max_steps": 3000, "lr": 1e-3, "seed": 13},
}


def model_ids(extra_models: dict[str, dict[str, Any]], root: str) -> dict[str, str]:
    """Each model's identity: ``root`` (the demo's) for the demo's own, for an extra model a digest of its
    settings and of the identity of the model it starts from (so retraining teacher A retrains teacher B)."""
    ids = {"base-A": root, "teacher-demo": root}

    def ident(name: str) -> str:
        if name not in ids:
            ids[name] = digest([extra_models[name], ident(_start(name, extra_models))], 16)
        return ids[name]

    for name in extra_models:
        ident(name)
    return ids


def _start(name: str, extra_models: dict[str, dict[str, Any]]) -> str:
    """The model extra model ``name`` starts from, as "kind-which" ("teacher-demo", "base-A", "teacher-A")."""
    settings = extra_models[name]
    return f"{settings['kind']}-{settings['from']}"


def plateaued(curve: list[tuple[int, float]], delta: float) -> bool:
    """Whether the last two held-out scores of ``curve`` ((step, CE) pairs, evenly spaced) differ by less
    than ``delta`` nats: the base student's CE plateau."""
    return len(curve) >= 2 and curve[-2][1] - curve[-1][1] < delta


def _pretrain_pool(ctx: dict[str, Any], tokenizer: Any) -> np.ndarray:
    """[N, L] the demo's pretraining sequences (its KD corpus minus the held-out split, plus the
    pretraining-only text), by the demo's own rule."""
    from types import SimpleNamespace

    from selkd.trainer.demo.pretraining import Pretraining

    run = SimpleNamespace(budget=SimpleNamespace(seq_len=ctx["seq_len"]))
    corpus = SimpleNamespace(
        kd_path=Path(ctx["kd_data"]), extra_path=Path(ctx["extra_data"]), extra_rows=True,
        eval_fraction=ctx["eval_fraction"],
    )  # fmt: skip
    return Pretraining(run, corpus, tokenizer, {}, Path(ctx["out"])).pool()


def _ce_steps(
    model: Any, pool: np.ndarray, steps: int, batch: int, lr: tuple[float, float], opt: Any, rng: Any
) -> float:
    """``steps`` AdamW steps of next-token CE on batches of ``rng``-drawn rows of ``pool`` ([N, L]), the lr
    a cosine from ``lr[0]`` to ``lr[1]`` (equal: constant); returns the mean training CE."""
    model.train()
    total = 0.0
    for i in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr[1] + (lr[0] - lr[1]) * 0.5 * (1 + math.cos(math.pi * i / max(1, steps)))
        x = torch.from_numpy(pool[rng.integers(0, len(pool), batch)].astype(np.int64))
        total += float(ce_step(model, opt, x).detach())
    model.eval()
    return total / max(1, steps)


def ensure_model(name: str, ctx: dict[str, Any]) -> dict[str, Any]:
    """Train (or reuse) the extra model ``name`` of :data:`EXTRA_MODELS` under OUT/models; returns its
    record (steps, held-out CE curve). Written to a temporary directory and renamed: resumable."""
    from transformers import AutoTokenizer

    from selkd.cache.teacher import load_causal_lm
    from selkd.trainer.demo.models import save_model, score_sequences

    if (start := _start(name, ctx["extra_models"])) in ctx["extra_models"]:
        ensure_model(start, ctx)  # trained first, in this process (and that one's start before it)
    settings = ctx["extra_models"][name]
    kind, which = name.split("-")
    directory = Path(ctx[f"{kind}s"][which])
    stamp = directory / "bench-quality.json"
    if stamp.is_file() and (record := json.loads(stamp.read_text())).get("id") == ctx["model_ids"][name]:
        return {**record, "reused": True}
    source = ctx[f"{kind}s"][settings["from"]]
    model = load_causal_lm(source, "cpu", torch.float32).requires_grad_(True)  # loaded frozen, as a teacher
    tokenizer = AutoTokenizer.from_pretrained(source)
    pool = _pretrain_pool(ctx, tokenizer)
    seqs, _ = _eval_context(ctx)
    rng = np.random.default_rng(settings["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)  # the demo's
    batch = ctx["pretrain_batch"]
    curve = [(0, score_sequences(model, seqs)[0])]
    t0 = time.perf_counter()
    if kind == "teacher":
        lr = settings["lr"]
        _ce_steps(model, pool, settings["steps"], batch, (lr, lr / 10), opt, rng)
        curve.append((settings["steps"], score_sequences(model, seqs)[0]))
    else:
        while not plateaued(curve, settings["delta"]) and curve[-1][0] < settings["max_steps"]:
            n = min(settings["every"], settings["max_steps"] - curve[-1][0])
            _ce_steps(model, pool, n, batch, (settings["lr"], settings["lr"]), opt, rng)
            curve.append((curve[-1][0] + n, score_sequences(model, seqs)[0]))
    record = {"id": ctx["model_ids"][name], "settings": settings, "curve": curve, "seconds": time.perf_counter() - t0}
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(model, tokenizer, tmp)
    (tmp / "bench-quality.json").write_text(json.dumps(record, indent=1))
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    return {**record, "reused": False}


TIMING = {"steps": 12, "rounds": 2}  # the step-cost pass: short runs per method, interleaved A, B, ..., A, B, ...


def step_costs(
    ctx: dict[str, Any], filename: str = "step_costs.json", rounds: int = TIMING["rounds"]
) -> dict[str, Any]:
    """Per method of :data:`REGIME_METHODS`, its step time (s) and its ratio to full KD's, from short runs
    in this one process interleaved over ``rounds`` rounds on regime A/A's models and caches (the
    regimes share the student's shape and the cache's format, so one timing serves all four). Each run's
    step time is the median of its logged steps after the second, a method's the median over rounds: a
    pause of the process or a burst of load spoils a step or a round, not the ratio. Kept in
    OUT/``filename`` (``--retime`` writes another file: the equal-time runs keep the steps of the first)."""
    from selkd.trainer.loop import train

    path = Path(ctx["out"]) / filename
    timing = {**TIMING, "rounds": rounds}
    ident = digest([ctx["identity"], timing, [m[:6] for m in REGIME_METHODS], ctx["steps"]], 16)
    if path.is_file() and (saved := json.loads(path.read_text())).get("id") == ident:
        return saved
    by_name = {m.cost_of: m for m in methods() if m.key.startswith("rg-bAtA-") and not m.equal_time}
    times: dict[str, list[float]] = {name: [] for name in by_name}
    for _ in range(rounds):
        for name, m in by_name.items():
            out = Path(ctx["out"]) / "timing" / name
            if out.exists():
                shutil.rmtree(out)
            cfg = dataclasses.replace(train_config(m, 0, out, ctx), steps=timing["steps"], log_every=1)
            train(cfg)
            times[name].append(median_step_s(out / "metrics.jsonl"))
            shutil.rmtree(out)
    step_s = {name: statistics.median(t) for name, t in times.items()}
    costs = {"id": ident, "rounds": times, "step_s": step_s}
    costs["ratio"] = {name: t / step_s["kd-full"] for name, t in step_s.items()}
    path.write_text(json.dumps(costs, indent=1))
    return costs


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


WITHIN_NATS, COST_AT_MOST = 0.02, 0.6  # the issue's question: within 0.02 nat of full KD at <= 0.6x its step cost


def regime_rows(base: str, teacher: str) -> list[tuple[str, str, bool]]:
    """(method key, label, equal time) of one regime's table, in order; CE only is the base's."""
    rk = regime_key(base, teacher)
    rows = [(f"rg-b{base}-ce-only", "CE only", False)]
    rows += [(f"rg-{rk}-{name}", label, False) for name, label, *_ in REGIME_METHODS]
    rows += [
        (f"rg-{rk}-{name}-eqt", label, True)
        for name, label, select, *_ in REGIME_METHODS
        if has_equal_time(name, select)
    ]
    return rows


def verdicts(summary: dict[str, dict[str, Any]], ratio: dict[str, float], base: str, teacher: str) -> dict[str, Any]:
    """One regime's answers to the issue's questions, per entropy-selected method and budget ("steps":
    equal steps, "time": equal wall time): its CE minus full KD's (at equal steps: full KD's run is the
    same at both budgets), minus random 20%'s at the same budget, its step-cost ratio, and whether it is
    within :data:`WITHIN_NATS` of full KD at a step cost of at most :data:`COST_AT_MOST`."""
    rk = regime_key(base, teacher)
    full = summary[f"rg-{rk}-kd-full"]["ce"]
    out = {}
    for name in ENTROPY_METHODS:
        for budget, tail in (("steps", ""), ("time", "-eqt")):
            key, rand = f"rg-{rk}-{name}{tail}", f"rg-{rk}-random{tail}"
            if key not in summary or rand not in summary:
                continue
            ce = summary[key]["ce"]
            out[name, budget] = {
                "vs_full": ce - full,
                "vs_random": ce - summary[rand]["ce"],
                "ratio": ratio[name],
                "within": ce - full <= WITHIN_NATS and ratio[name] <= COST_AT_MOST,
                "beats_random": ce < summary[rand]["ce"],
            }
    return out


def regime_tables(summary: dict[str, dict[str, Any]], costs: dict[str, Any], steps: dict[str, int]) -> str:
    """Per regime: every method at equal steps, then the selecting ones at equal wall time."""
    head = (
        "| method | budget | steps | step cost (x full KD) | held-out CE (mean) | CE per seed | vs full KD "
        "| vs random 20% (same budget) | KL(teacher‖student) | entropy |\n"
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|"
    )
    parts = []
    for base, teacher in REGIMES:
        rk = regime_key(base, teacher)
        if f"rg-{rk}-kd-full" not in summary:
            continue
        full = summary[f"rg-{rk}-kd-full"]["ce"]
        lines = [f"#### Regime base {base}, teacher {teacher}\n", head]
        for key, label, eqt in regime_rows(base, teacher):
            if key not in summary:
                continue
            r = summary[key]
            name = key.removesuffix("-eqt").removeprefix(f"rg-{rk}-")
            rand = summary.get(f"rg-{rk}-random{'-eqt' if eqt else ''}")
            vs_rand = "—" if rand is None or name == "random" else f"{r['ce'] - rand['ce']:+.3f}"
            cost = costs["ratio"].get(name)
            lines.append(
                f"| {label} | {'equal time' if eqt else 'equal steps'} | {steps.get(key, steps['default'])} | "
                f"{'—' if cost is None else f'{cost:.2f}'} | {r['ce']:.3f} | "
                f"{' / '.join(f'{c:.3f}' for c in r['ce_seeds'])} | {r['ce'] - full:+.3f} | {vs_rand} | "
                f"{r['kl']:.3f} | {r['entropy']:.2f} |"
            )
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def regime_plot(summary: dict[str, dict[str, Any]], refs: dict[str, dict[str, Any]], where: Path) -> Path | None:
    """One figure: per regime a panel of held-out CE per method, equal steps and equal time side by side
    (mean and seeds); each panel's y axis is cut (marked) since the methods differ by tenths of a nat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(b, t) for b, t in REGIMES if f"rg-{regime_key(b, t)}-kd-full" in summary]
    if not shown:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5), squeeze=False)
    names = [("ce-only", "CE only")] + [(m[0], m[1]) for m in REGIME_METHODS]
    for ax, (base, teacher) in zip(axes.flat, shown, strict=False):
        rk, vals = regime_key(base, teacher), []
        for x, (name, _) in enumerate(names):
            key = f"rg-b{base}-ce-only" if name == "ce-only" else f"rg-{rk}-{name}"
            for dx, k, color, label in ((-0.15, key, "C0", "equal steps"), (0.15, f"{key}-eqt", "C1", "equal time")):
                if k in summary:
                    ax.bar(x + dx, summary[k]["ce"], 0.3, color=color, alpha=0.6, label=label)
                    ax.scatter([x + dx] * len(summary[k]["ce_seeds"]), summary[k]["ce_seeds"], color="black", s=8)
                    vals += summary[k]["ce_seeds"]
        ax.axhline(summary[f"rg-{rk}-kd-full"]["ce"], color="grey", linestyle="--", lw=1, label="full KD")
        lo = min(vals) - 0.05
        ax.set_ylim(lo, max(vals) + 0.03)
        ax.set_ylabel(f"held-out CE (nats); axis cut at {lo:.2f}", fontsize=8)
        ax.set_xticks(range(len(names)), [n[1] for n in names], rotation=35, ha="right", fontsize=7)
        ax.set_title(
            f"base {base} (CE {refs[f'base {base}']['ce']:.2f}), teacher {teacher} "
            f"(CE {refs[f'teacher {teacher}']['ce']:.2f})",
            fontsize=9,
        )
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left")
    fig.suptitle("Regime map: held-out CE per method (bars: mean over seeds; dots: seeds)", fontsize=10)
    fig.tight_layout()
    path = where / "quality-regimes.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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


def regime_report(
    summary: dict[str, dict[str, Any]], rrefs: dict[str, dict[str, Any]], costs: dict[str, Any], ctx: dict[str, Any]
) -> str:
    """The regimes' markdown: the extra models, the step costs, the map (one line per regime) and the
    per-regime tables."""
    lines = ["\n#### Regimes: the models\n"]
    for name, rec in costs["models"].items():
        curve = ", ".join(f"{s}: {ce:.3f}" for s, ce in rec["curve"])
        lines.append(f"- {name}: held-out CE by step {curve} ({rec['seconds']:.0f} s)")
    lines.append("- " + ", ".join(f"{k} {v['ce']:.3f}" for k, v in rrefs.items()) + " (held-out CE)")
    lines.append("\nstep cost (median step time; ratio to full KD's), per timing round: " + "; ".join(
        f"{k} {costs['step_s'][k] * 1000:.0f} ms = {costs['ratio'][k]:.2f}x "
        f"({', '.join(f'{t * 1000:.0f}' for t in costs['rounds'][k])})" for k in costs["step_s"]
    ) + "\n")  # fmt: skip
    lines += [
        "#### The map: entropy-selected methods against full KD and random 20%\n",
        "| regime | method | step cost | vs full KD, equal steps | vs full KD, equal time | vs random, equal steps "
        f"| vs random, equal time | within {WITHIN_NATS} nat at <= {COST_AT_MOST}x |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    labels = {m[0]: m[1] for m in REGIME_METHODS}
    for base, teacher in REGIMES:
        if f"rg-{regime_key(base, teacher)}-kd-full" not in summary:
            continue
        v = verdicts(summary, costs["ratio"], base, teacher)
        for name in ENTROPY_METHODS:
            st, tm = v.get((name, "steps")), v.get((name, "time"))
            if st is None:
                continue

            def d(x: dict[str, Any] | None, k: str) -> str:
                return "—" if x is None else f"{x[k]:+.3f}"

            lines.append(
                f"| base {base}, teacher {teacher} | {labels[name]} | {st['ratio']:.2f}x | {d(st, 'vs_full')} | "
                f"{d(tm, 'vs_full')} | {d(st, 'vs_random')} | {d(tm, 'vs_random')} | "
                f"{'yes' if st['within'] or (tm and tm['within']) else 'no'} |"
            )
    steps = {"default": ctx["steps"], **ctx["run_steps"]}
    return "\n".join(lines) + "\n\n" + regime_tables(summary, costs, steps)


def _build(ctx: dict[str, Any], name: str) -> None:
    build_s = ensure_cache(ctx, name)
    if build_s is not None:
        print(f"built {ctx['caches'][name]} in {build_s:.0f} s", flush=True)


def prepare_regimes(ctx: dict[str, Any], pool: ProcessPoolExecutor) -> dict[str, Any]:
    """The regimes' extra models (trained in ``pool``, at once), teacher B's ``full`` cache and the step
    costs; sets the equal-time runs' steps in ``ctx["run_steps"]``. Returns the costs, with the models'
    records under "models"."""
    extra = ctx["extra_models"]
    starts = {_start(name, extra) for name in extra}  # trained inside the chains that need them
    futures = {name: pool.submit(ensure_model, name, ctx) for name in extra if name not in starts}
    models = {name: fut.result() for name, fut in futures.items()}
    models.update({name: ensure_model(name, ctx) for name in extra if name in starts})
    for name, rec in models.items():
        how = "reused" if rec["reused"] else f"{rec['seconds']:.0f} s"
        print(f"{name}: held-out CE {' -> '.join(f'{ce:.3f}' for _, ce in rec['curve'])} ({how})", flush=True)
    for name in ("full-tA", "full-tB"):
        _build(ctx, name)
    costs = step_costs(ctx)
    print("step cost vs full KD: " + ", ".join(f"{k} {v:.2f}x" for k, v in costs["ratio"].items()), flush=True)
    for m in methods():
        if m.equal_time:
            full = costs["step_s"]["kd-full"]
            ctx["run_steps"][m.key] = equal_time_steps(ctx["steps"], full, costs["step_s"][m.cost_of])
    return {**costs, "models": models}


# ----------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", required=True, type=Path, help="output directory of a finished `selkd-demo` run")
    p.add_argument("--out", required=True, type=Path, help="where the topk:64 cache, runs and tables go")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (default: 0 1)")
    p.add_argument("--groups", nargs="+", choices=GROUPS, default=list(GROUPS), help="which ablations (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once, one torch thread each (default: 2)")
    p.add_argument("--plots", type=Path, help="directory for the PNG plots (default: OUT)")
    p.add_argument("--steps", type=int, help="training steps of every run (default: the demo's KD steps)")
    p.add_argument("--report-only", action="store_true", help="tables and plots of the runs already finished")
    p.add_argument(
        "--retime",
        type=int,
        metavar="ROUNDS",
        help="regimes: only time the methods' steps again, ROUNDS interleaved rounds, into OUT/step_costs-retime.json "
        "(a check of the first timing, on a quieter machine; the runs keep their steps)",
    )
    p.add_argument(
        "--plateau-steps",
        type=int,
        default=EXTRA_MODELS["base-B"]["max_steps"],
        help="regimes: the most CE steps base B trains looking for its held-out plateau (default: %(default)s)",
    )
    args = p.parse_args()
    if min(args.jobs, args.plateau_steps, args.steps or 1, args.retime or 1) < 1:
        p.error("--jobs, --steps, --plateau-steps and --retime must be >= 1")
    t_start = time.perf_counter()
    extra = {**EXTRA_MODELS, "base-B": {**EXTRA_MODELS["base-B"], "max_steps": args.plateau_steps}}
    ctx = demo_context(args.demo.resolve(), args.out.resolve(), extra)
    ctx["steps"] = args.steps or ctx["steps"]
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, args.jobs))
    _worker_init(max(1, args.jobs))
    todo = [(m, s) for m in methods() if set(m.groups) & set(args.groups) for s in args.seeds]
    for name in BUILDS:  # teacher B's after the regimes' models, in prepare_regimes
        if BUILDS[name][1] == "demo" and any(m.source == name for m, _ in todo):
            _build(ctx, name)
    todo.sort(key=lambda ms: (run_tier(ms[0]), ms[1]))  # should the runs be cut short, what is done means the most
    records, costs = [], {}
    with ProcessPoolExecutor(
        args.jobs, mp_context=get_context("spawn"), initializer=_worker_init, initargs=(1,)
    ) as pool:
        if "regimes" in args.groups:
            costs = prepare_regimes(ctx, pool)
        if args.retime and "regimes" in args.groups:
            again = step_costs(ctx, "step_costs-retime.json", args.retime)
            print("step cost vs full KD, again: " + ", ".join(f"{k} {v:.2f}x" for k, v in again["ratio"].items()))
            print(
                "per round (ms): "
                + "; ".join(f"{k} {[round(t * 1000) for t in v]}" for k, v in again["rounds"].items())
            )
            return
        if args.report_only:
            records = [r for m, s in todo if (r := finished(m, s, ctx)[2]) is not None]
            print(f"--report-only: {len(records)} of {len(todo)} runs finished", flush=True)
            todo = []
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
    for name, path in (("teacher", ctx["teachers"]["demo"]), ("base student", ctx["bases"]["A"])):
        m = score(log_softmax_rows(load_causal_lm(path, "cpu", torch.float32), seqs), seqs, logp)
        refs[name] = {**m, "agree": None if name == "teacher" else m["agree"]}
    summary = summarize(records)
    made = plots(summary, refs, args.plots or args.out)
    regime_text = ""
    if "regimes" in args.groups:
        rrefs = {f"{kind} {k}": score(log_softmax_rows(load_causal_lm(path, "cpu", torch.float32), seqs), seqs, logp)
                 for kind in ("teacher", "base") for k, path in ctx[f"{kind}s"].items()}  # fmt: skip
        refs.update(rrefs)
        regime_text = regime_report(summary, rrefs, costs, ctx)
        made += [p for p in [regime_plot(summary, rrefs, args.plots or args.out)] if p is not None]

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
    text = "\n".join(head) + "\n" + tables(summary, refs, args.groups) + regime_text
    text += "".join(f"\n![{p.stem}]({p})\n" for p in made)
    print("\n" + text)
    (args.out / "quality.md").write_text(text)
    (args.out / "quality.json").write_text(
        json.dumps(
            {"refs": refs, "summary": summary, "records": records, "ctx": ctx, "costs": costs}, indent=1, default=str
        )
    )


if __name__ == "__main__":
    main()

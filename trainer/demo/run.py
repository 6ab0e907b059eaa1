"""The demo's pipeline, stage by stage: corpus, tokenizer, base student, teacher, caches, students,
evaluation, report (see the package docstring for why it is built this way)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selkd.trainer.demo.corpus import split_documents, stdlib_documents, user_documents, write_rows
from selkd.trainer.demo.machine import default_threads, machine_info, peak_memory_mb, reset_peak_memory
from selkd.trainer.demo.models import make_llama, n_params, pretrain_lm, score_sequences, train_tokenizer
from selkd.trainer.demo.report import DemoResult, Row, format_table, make_plots, read_metrics, write_report
from selkd.trainer.demo.settings import BUDGETS, CLASSES, METHODS, SAMPLE_RATIO, SEED, SELECT, Shape, plan_kd_steps
from selkd.trainer.demo.util import as_cli, digest, fmt_s, human_bytes, logged, read_json, say, write_json


class _Stages:
    """Numbered stage headings with their times."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.seconds = total, 0, {}
        self._name: str | None = None
        self._t0 = 0.0

    @contextlib.contextmanager
    def stage(self, name: str, title: str) -> Iterator[None]:
        self.n += 1
        say(f"[{self.n}/{self.total}] {title}")
        t0 = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t0
        say(f"      done in {fmt_s(self.seconds[name])}")


def _models_root(path: str | None) -> Path:
    if path:
        return Path(path).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "selkd"


def _pack(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """[N, seq_len] full-length sequences of a token stream (the short tail is dropped)."""
    n = len(tokens) // seq_len
    return tokens[: n * seq_len].reshape(n, seq_len)


def _ensure_model(
    what: str,
    directory: Path,
    key: dict[str, Any],
    build: Callable[[], tuple[Any, dict[str, Any]]],
    tokenizer: Any,
) -> tuple[dict[str, Any], bool]:
    """Reuse ``directory`` when its stamp matches ``key``; else train (``build``) and save it there.
    Returns the stamp (training record) and whether it was reused."""
    stamp_path = directory / "selkd-demo.json"
    stamp = read_json(stamp_path)
    if stamp is not None and stamp.get("key") == key and (directory / "config.json").is_file():
        return stamp, True
    if directory.exists():
        shutil.rmtree(directory)
    model, record = build()
    tmp = directory.with_name(directory.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    record = {"key": key, "what": what, **record}
    write_json(tmp / "selkd-demo.json", record)
    tmp.rename(directory)
    return record, False


@contextlib.contextmanager
def _quiet_torch(threads: int) -> Iterator[None]:
    """Torch threads and transformers' logging for the demo, restored afterwards (the demo is also a
    library function: the tests call it, and it must not leave the caller's process changed)."""
    import transformers

    log = transformers.utils.logging
    before = (torch.get_num_threads(), log.get_verbosity(), log.is_progress_bar_enabled())
    torch.set_num_threads(threads)
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        log.set_verbosity(before[1])
        if before[2]:
            log.enable_progress_bar()


def run_demo(
    *,
    quick: bool = False,
    data: Sequence[str] | None = None,
    text_field: str = "text",
    out: str | Path = "selkd-demo",
    models: str | None = None,
    budget_scale: float = 1.0,
    threads: int | None = None,
    rerun: bool = False,
) -> DemoResult:
    """Run the demo (see the package docstring); returns the table's rows and where the report is."""
    threads = threads or default_threads()
    with _quiet_torch(threads):
        return _run_demo(
            quick=quick,
            data=data,
            text_field=text_field,
            out=out,
            models=models,
            budget_scale=budget_scale,
            threads=threads,
            rerun=rerun,
        )


def _run_demo(
    *,
    quick: bool,
    data: Sequence[str] | None,
    text_field: str,
    out: str | Path,
    models: str | None,
    budget_scale: float,
    threads: int,
    rerun: bool,
) -> DemoResult:
    from selkd.cache.build import build_cache
    from selkd.cache.config import BuildConfig
    from selkd.cache.corpus import eval_mask, load_corpus
    from selkd.cache.documents import DataError
    from selkd.cache.info import cache_info
    from selkd.cache.reader import open_cache
    from selkd.cache.teacher import load_causal_lm, load_tokenizer
    from selkd.trainer.config import TrainConfig
    from selkd.trainer.loop import train

    t_start = time.perf_counter()
    budget = BUDGETS["quick" if quick else "full"].scaled(budget_scale)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    stages = _Stages(8)
    warnings: list[str] = []
    commands: list[str] = []
    say(
        f"selkd-demo: {budget.name} budget{f' x{budget_scale:g}' if budget_scale != 1 else ''}, {threads} "
        f"thread(s), output {out}"
    )

    # --- 1. corpus ----------------------------------------------------------------------------------
    with stages.stage("corpus", "corpus"):
        if data:
            docs = user_documents(data, text_field, max_chars=3 * int((budget.kd_tokens + budget.extra_tokens) * 3.5))
            corpus_name = "--data " + " ".join(data)
        else:
            docs = stdlib_documents()
            corpus_name = f"Python {platform.python_version()} standard library ({len(docs)} files, tests excluded)"
        if not docs:
            raise DataError("the corpus is empty")
        cpt = 3.5 if budget.vocab >= 4096 else 3.1  # characters per token of a code BPE, to size the split
        kd_rows, extra_rows = split_documents(docs, int(budget.kd_tokens * cpt), int(budget.extra_tokens * cpt))
        data_dir = out / "data"
        kd_path, extra_path = data_dir / "kd.jsonl", data_dir / "extra.jsonl"
        kd_hash = write_rows(kd_path, kd_rows)
        extra_hash = write_rows(extra_path, extra_rows)
        kd_chars, extra_chars = sum(map(len, kd_rows)), sum(map(len, extra_rows))
        # SE-KD 3X trains on SAMPLE_RATIO of the training sequences: at least one batch of them
        need = (budget.kd_batch / SAMPLE_RATIO + budget.eval_sequences + 1) * budget.seq_len * cpt
        if kd_chars < need:
            raise DataError(
                f"the corpus is too small for the demo: {kd_chars:,} characters, at least {need:,.0f} are needed "
                f"for the KD corpus (give more text with --data)"
            )
        say(
            f"      {corpus_name}: KD corpus {len(kd_rows):,} rows ({human_bytes(kd_chars)}), pretraining-only "
            f"text {len(extra_rows):,} rows ({human_bytes(extra_chars)}) -> {data_dir}"
        )

    # --- 2. tokenizer -------------------------------------------------------------------------------
    with stages.stage("tokenizer", f"tokenizer: byte-level BPE, {budget.vocab:,} tokens"):
        tok_key = {"kd": kd_hash, "extra": extra_hash, "vocab": budget.vocab, "chars": budget.tokenizer_chars}
        home = _models_root(models) / f"demo-{digest(tok_key)}"
        tok_dir = home / "tokenizer"
        if read_json(tok_dir / "selkd-demo.json") == {"key": tok_key}:
            tokenizer = load_tokenizer(str(tok_dir))
            say(f"      reused {tok_dir}")
        else:
            sample, size = [], 0
            for row in (*kd_rows, *extra_rows):
                if size >= budget.tokenizer_chars:
                    break
                sample.append(row)
                size += len(row)
            if tok_dir.exists():
                shutil.rmtree(tok_dir)
            tokenizer = train_tokenizer(sample, budget.vocab, tok_dir)
            write_json(tok_dir / "selkd-demo.json", {"key": tok_key})
            say(f"      trained on {human_bytes(size)} -> {tok_dir} ({len(tokenizer):,} tokens)")

    # The KD corpus exactly as the caches will pack it, and its held-out split (the caches' eval split).
    # (estimated from characters, so that it is known before anything is tokenized and stays a pure
    # function of the corpus files: it is part of every later stage's identity)
    n_kd_seq_estimate = max(2.0, kd_chars / (cpt * budget.seq_len))
    eval_fraction = min(0.5, round(budget.eval_sequences / n_kd_seq_estimate, 4))
    pool_cache: dict[str, np.ndarray] = {}

    def pretraining_pool() -> np.ndarray:
        """Training sequences for teacher and base: the KD corpus minus its held-out sequences, plus the
        pretraining-only text. Tokenized only when a model has to be trained."""
        if "pool" not in pool_cache:
            kd = load_corpus([str(kd_path)], tokenizer, budget.seq_len, progress=False)
            held = eval_mask(kd.n_sequences, eval_fraction, SEED)
            parts = [np.stack([kd.sequence(i) for i in np.flatnonzero(~held) if len(kd.sequence(i)) == budget.seq_len])]
            if extra_rows:
                extra = load_corpus([str(extra_path)], tokenizer, budget.seq_len, progress=False)
                parts.append(_pack(extra.tokens, budget.seq_len))
            pool_cache["pool"] = np.concatenate(parts).astype(np.int32)
        return pool_cache["pool"]

    split_key = {"tokenizer": tok_key, "seq_len": budget.seq_len, "eval_fraction": eval_fraction, "seed": SEED}
    pretrain: dict[str, dict[str, Any]] = {}

    def pretrain_stage(
        what: str, shape: Shape, seconds: float, lr: float, seed: int, plan: Callable[[], float] | None = None
    ) -> tuple[Path, dict[str, Any], bool]:
        """Train (or reuse) one model. ``seconds`` is the nominal budget, part of the model's identity;
        ``plan`` may lower the budget actually spent when the run is late (a busy machine)."""
        key = {
            "split": split_key,
            "shape": dataclasses.asdict(shape),
            "seconds": seconds,
            "lr": lr,
            "batch": budget.pretrain_batch,
            "seed": seed,
        }
        directory = home / f"{what}-{digest(key, 8)}"

        def build() -> tuple[Any, dict[str, Any]]:
            pool = pretraining_pool()
            model = make_llama(shape, tokenizer, max_pos=budget.seq_len, seed=seed)
            spend = seconds if plan is None else plan()
            say(
                f"      {n_params(model) / 1e6:.2f}M params ({shape.describe()}); {spend:.0f} s of CE on "
                f"{pool.size:,} tokens, batch {budget.pretrain_batch} x {budget.seq_len}, lr {lr:g}"
            )
            reset_peak_memory()
            rec = pretrain_lm(model, pool, spend, budget.pretrain_batch, lr, seed)
            rec["budget_seconds"] = spend
            rec["peak_mb"] = peak_memory_mb()
            rec["params"] = n_params(model)
            return model, rec

        record, reused = _ensure_model(what, directory, key, build, tokenizer)
        note = "reused" if reused else "trained"
        say(
            f"      {note}: {record['steps']:,} steps, {record['tokens'] / 1e6:.2f}M tokens in "
            f"{record['seconds']:.0f} s, final train CE {record['curve'][-1][2]:.3f} -> {directory}"
        )
        pretrain[what] = {**record, "reused": reused}
        return directory, record, reused

    def plan_teacher() -> float:
        """The teacher's budget: nominal, unless the base student's pretraining shows a machine so slow
        (or busy) that the stages after the teacher, whose cost is fixed in steps, would push the first run
        past its target; then somewhat less. Never under 3/4: the teacher's margin over the students is what
        makes the comparison mean anything, and on a busy machine it is already the first thing to shrink."""
        base = pretrain["base"]
        step_s = base["seconds"] / max(1, base["steps"])
        a, b, c = budget.rest_cost
        kd_batches = budget.kd_tokens / (budget.pretrain_batch * budget.seq_len)
        rest = step_s * (a * budget.kd_steps + b * kd_batches + c)
        left = budget.target_seconds - (time.perf_counter() - t_start) - rest
        spend = min(budget.teacher_seconds, max(0.75 * budget.teacher_seconds, left))
        if spend < budget.teacher_seconds:
            say(
                f"      this machine is slower than planned ({step_s * 1000:.0f} ms per base-student step): the "
                f"teacher trains {spend:.0f} s instead of {budget.teacher_seconds:.0f} s to keep the run near "
                f"{budget.target_seconds / 60:.0f} minutes"
            )
        return spend

    # --- 3. base student, 4. teacher ------------------------------------------------------------------
    # The base student first: its step time tells how fast this machine is, which sizes the teacher's budget.
    with stages.stage(
        "base", f"base student: Llama {budget.student.describe()}, {budget.base_seconds:.0f} s of plain CE"
    ):
        base_dir, _, _ = pretrain_stage("base", budget.student, budget.base_seconds, budget.base_lr, SEED + 1)
        nominal_steps = budget.kd_steps
        budget = plan_kd_steps(budget, pretrain["base"])
        if budget.kd_steps != nominal_steps:
            say(
                f"      this machine is slower than the one the budget was sized on: the students will train "
                f"{budget.kd_steps} steps instead of {nominal_steps} (all methods alike)"
            )
    with stages.stage("teacher", f"teacher: Llama {budget.teacher.describe()}, up to {budget.teacher_seconds:.0f} s"):
        teacher_dir, _, _ = pretrain_stage(
            "teacher", budget.teacher, budget.teacher_seconds, budget.teacher_lr, SEED, plan_teacher
        )
    pool_cache.clear()

    # --- 5. caches --------------------------------------------------------------------------------------
    caches: dict[str, Path] = {"full": out / "caches" / "full", "sel20": out / "caches" / "sel20"}
    cache_stats: dict[str, dict[str, Any]] = {}
    with stages.stage("caches", f"caches: selkd-cache build --classes {CLASSES} (all sequences; top {SAMPLE_RATIO:g})"):
        for name, path in caches.items():
            cfg = BuildConfig(
                teacher=str(teacher_dir),
                data=[str(kd_path)],
                out=str(path),
                classes=CLASSES,
                max_seq_len=budget.seq_len,
                eval_fraction=eval_fraction,
                seed=SEED,
                device="cpu",
                batch_size=budget.cache_batch,
                progress=False,
                **({"student": str(base_dir), "sample_ratio": SAMPLE_RATIO} if name == "sel20" else {}),
            )
            command = as_cli("selkd-cache build", cfg, BuildConfig(teacher="T", data=["D"], out="O"), ["classes"])
            commands.append(command)
            key = {"teacher": str(teacher_dir), "base": str(base_dir), "kd": kd_hash, "cfg": dataclasses.asdict(cfg)}
            stamp_path = path.with_name(path.name + ".selkd-demo.json")
            stamp = read_json(stamp_path)
            if stamp is not None and stamp.get("key") == key and "bytes" in stamp and _complete(path):
                cache_stats[name] = stamp
                say(f"      {name}: reused {path} (built in {stamp['seconds']:.0f} s)")
                continue
            if path.exists() and (stamp is None or stamp.get("key") != key):
                shutil.rmtree(path)  # built from other inputs: a build would refuse to resume it
            write_json(stamp_path, {"key": key})  # same key next time: an interrupted build resumes
            say(f"      {name}: {command}")
            t0 = time.perf_counter()
            with logged(logs / f"cache-{name}.log"):
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
            cache_stats[name] = stamp
            say(
                f"      {name}: {info.sequences_train:,} train + {info.sequences_eval:,} held-out sequences, "
                f"{human_bytes(info.bytes_on_disk)} ({info.bytes_per_stored_position or 0:.1f} B/position) in "
                f"{seconds:.0f} s"
            )

    # The held-out sequences, read back from the cache: the exact split every trainer evaluates on.
    reader = open_cache(str(caches["full"]))
    eval_seqs = [np.asarray(s.input_ids) for s in reader.eval_sequences()]
    eval_index = sorted(s.seq_index for s in reader.eval_sequences())
    held = eval_mask(int(reader.header["data"]["n_sequences"]), eval_fraction, SEED)
    if eval_index != np.flatnonzero(held).tolist():
        raise RuntimeError("the cache's eval split differs from the one pretraining left out")

    # --- 6. students ------------------------------------------------------------------------------------
    runs_dir = out / "runs"
    run_records: dict[str, dict[str, Any]] = {}
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
    with stages.stage("students", f"students: {len(METHODS)} methods x {budget.kd_steps} steps from the base student"):
        for m in METHODS:
            run_out = runs_dir / m.key
            if m.kind == "online":
                cfg = TrainConfig(
                    out=str(run_out),
                    teacher=str(teacher_dir),
                    data=[str(kd_path)],
                    max_seq_len=budget.seq_len,
                    eval_fraction=eval_fraction,
                    select=m.select,
                    **common,
                )
            else:
                cfg = TrainConfig(
                    out=str(run_out),
                    cache=str(caches[m.cache or "full"]),
                    select=m.select,
                    kd_weight=m.kd_weight,
                    ce_weight=m.ce_weight,
                    **common,
                )
            if m.kind == "online":
                defaults = TrainConfig(out="O", teacher="T", data=["D"], student="S")
            else:
                defaults = TrainConfig(out="O", cache="C", student="S")
            command = as_cli("selkd-train", cfg, defaults)
            commands.append(command)
            key = {
                "cfg": cfg.to_dict(),
                "teacher": str(teacher_dir),
                "cache": cache_stats[m.cache]["key"] if m.cache else None,
                "kind": m.kind,
            }
            stamp_path = run_out / "selkd-demo.json"
            stamp = read_json(stamp_path)
            done = (run_out / "final" / "config.json").is_file()
            if not rerun and stamp is not None and stamp.get("key") == key and done:
                run_records[m.key] = {**stamp, "reused": True}
                say(f"      {m.label}: reused {run_out} (trained in {stamp['wall_s']:.0f} s)")
                continue
            if run_out.exists():
                shutil.rmtree(run_out)
            say(f"      {m.label} ...")
            reset_peak_memory()
            t0 = time.perf_counter()
            with logged(logs / f"train-{m.key}.log"):
                say(command)
                result = train(cfg)
            wall = time.perf_counter() - t0
            peak = peak_memory_mb()
            stamp = {"key": key, "wall_s": wall, "peak_mb": peak, "final": result.get("final"), "steps": result["step"]}
            write_json(stamp_path, stamp)
            run_records[m.key] = {**stamp, "reused": False}
            say(
                f"      {m.label}: {result['step']} steps in {wall:.0f} s, trainer's held-out CE "
                f"{result.get('eval_ce', float('nan')):.3f}"
            )

    # --- 7. evaluation ------------------------------------------------------------------------------------
    rows: list[Row] = []
    with stages.stage("evaluate", f"evaluation: {len(eval_seqs)} held-out sequences, teacher, base and students"):
        teacher = load_causal_lm(str(teacher_dir), "cpu", torch.float32)
        t_ce, _, t_top = score_sequences(teacher, eval_seqs)
        del teacher
        for what, label in (("teacher", "teacher"), ("base", "base student (start of every method)")):
            rec = pretrain[what]
            if what == "teacher":
                ce, agree = t_ce, None
            else:
                model = load_causal_lm(str(base_dir), "cpu", torch.float32)
                ce, agree, _ = score_sequences(model, eval_seqs, t_top)
            rows.append(
                Row(
                    what,
                    f"{label} ({rec['params'] / 1e6:.2f}M, {rec['seconds']:.0f} s CE)",
                    ce,
                    math.exp(min(ce, 50)),
                    agree,
                    rec["seconds"],
                    rec.get("peak_mb"),
                    None,
                    None,
                    None,
                    reused=rec["reused"],
                    params=rec["params"],
                )
            )
        for m in METHODS:
            rec = run_records[m.key]
            run_out = runs_dir / m.key
            model = load_causal_lm(str(run_out / "final"), "cpu", torch.float32)
            ce, agree, _ = score_sequences(model, eval_seqs, t_top)
            stats = cache_stats.get(m.cache) if m.kind == "cache" and m.uses_teacher else None
            curve, eval_curve = read_metrics(run_out / "metrics.jsonl")
            base_ce = rows[1].eval_ce
            rows.append(
                Row(
                    m.key,
                    m.label,
                    ce,
                    math.exp(min(ce, 50)),
                    agree,
                    rec["wall_s"],
                    rec["peak_mb"],
                    None if stats is None else int(stats["bytes"]),
                    None if stats is None else stats["bytes_per_position"],
                    None if stats is None else stats["bytes_per_corpus_position"],
                    reused=rec["reused"],
                    cache_build_s=None if stats is None else stats["seconds"],
                    curve=curve,
                    eval_curve=[[0, base_ce], *eval_curve],
                )
            )
        n_pos = sum(len(s) - 1 for s in eval_seqs)
        say(f"      teacher {rows[0].eval_ce:.3f}, base {rows[1].eval_ce:.3f} nats on {n_pos:,} positions")

    # --- 8. table and report -------------------------------------------------------------------------------
    by_key = {r.key: r for r in rows}
    margin = 0.1  # nats: 'clearly better'
    for other in ("base", "ce-only"):
        if by_key["teacher"].eval_ce > by_key[other].eval_ce - margin:
            warnings.append(
                f"the teacher ({by_key['teacher'].eval_ce:.3f}) is not clearly better than the {other} student "
                f"({by_key[other].eval_ce:.3f}) on held-out CE, so the comparison says little: the time-budgeted "
                "teacher trained too little (a slow or busy machine, --quick or --budget-scale below 1; the full demo "
                "trains a stronger one)"
            )
    table = format_table(rows)
    settings = {
        "budget": {
            k: (dataclasses.asdict(v) if isinstance(v, Shape) else v) for k, v in dataclasses.asdict(budget).items()
        },
        "budget_scale": budget_scale,
        "kd_steps_nominal": nominal_steps,
        "corpus": corpus_name,
        "kd_corpus_rows": len(kd_rows),
        "extra_rows": len(extra_rows),
        "eval_fraction": eval_fraction,
        "eval_sequences": len(eval_seqs),
        "classes": CLASSES,
        "select": SELECT,
        "sample_ratio": SAMPLE_RATIO,
        "seed": SEED,
        "models": str(home),
        "teacher_dir": str(teacher_dir),
        "base_dir": str(base_dir),
        "kd_data": str(kd_path),
        "caches": {k: {kk: vv for kk, vv in v.items() if kk != "key"} for k, v in cache_stats.items()},
        "pretraining": {k: {kk: vv for kk, vv in v.items() if kk not in ("curve", "key")} for k, v in pretrain.items()},
    }
    with stages.stage("report", "report"):
        notes = [
            *warnings,
            *(
                f"Cache `{n}`: {s['sequences_train']:,} training sequences, {human_bytes(s['bytes'])}, built in "
                f"{s['seconds']:.0f} s ({s['mean_unique_ids'] or 0:.1f} unique ids per position, teacher entropy "
                f"{s['mean_teacher_entropy'] or 0:.2f} nats)."
                for n, s in cache_stats.items()
            ),
        ]
        plots, plot_note = make_plots(rows, pretrain, out)
        if plot_note:
            notes.append(plot_note)
        machine = machine_info(threads)
        stage_seconds = dict(stages.seconds)
        report = write_report(out, rows, table, settings, machine, stage_seconds, commands, plots, notes)
        total = time.perf_counter() - t_start
        result = DemoResult(rows, table, report, plots, settings, stage_seconds, total, warnings)
        write_json(
            out / "results.json",
            {
                "rows": [dataclasses.asdict(r) for r in rows],
                "settings": settings,
                "machine": machine,
                "stage_seconds": stage_seconds,
                "total_seconds": total,
                "warnings": warnings,
            },
        )
    say("")
    say(table)
    for w in warnings:
        say(f"warning: {w}")
    say(f"\nreport: {report}   (total {fmt_s(time.perf_counter() - t_start)})")
    return result


def _complete(path: Path) -> bool:
    """Whether ``path`` holds a finalized cache (every part committed)."""
    from selkd.cache.reader import CacheError, open_cache

    try:
        return open_cache(str(path)).summary is not None
    except (CacheError, OSError, ValueError):
        return False

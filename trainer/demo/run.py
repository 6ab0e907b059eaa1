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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selkd.trainer.demo.corpus import split_documents, stdlib_documents, user_documents, write_rows
from selkd.trainer.demo.machine import default_threads, machine_info, peak_memory_mb, reset_peak_memory
from selkd.trainer.demo.models import (
    make_llama,
    n_params,
    pretrain_lm,
    save_model,
    score_sequences,
    special_ids,
    train_tokenizer,
)
from selkd.trainer.demo.report import DemoResult, Row, format_table, make_plots, read_metrics, write_report
from selkd.trainer.demo.settings import (
    BUDGETS,
    CLASSES,
    METHODS,
    SAMPLE_RATIO,
    SEED,
    SELECT,
    Budget,
    Method,
    Shape,
    plan_kd_steps,
)
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
    save_model(model, tokenizer, tmp)
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


@dataclass
class _Run:
    """One demo run's settings, and what every stage adds to the report."""

    budget: Budget  # replaced by the machine-fitted plan once the base student has trained (plan_kd_steps)
    budget_scale: float
    out: Path
    threads: int
    rerun: bool
    t_start: float
    stages: _Stages
    nominal_kd_steps: int
    warnings: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)  # the CLI equivalent of each stage

    @property
    def logs(self) -> Path:
        return self.out / "logs"


@dataclass
class _Corpus:
    """The KD corpus and the pretraining-only text, as written under ``OUT/data``."""

    name: str  # how the report names it
    kd_rows: list[str]
    extra_rows: list[str]
    kd_path: Path
    extra_path: Path
    kd_hash: str
    extra_hash: str
    chars_per_token: float  # of a code BPE, to size the split before anything is tokenized
    eval_fraction: float  # the caches' held-out split


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
    budget = BUDGETS["quick" if quick else "full"].scaled(budget_scale)
    run = _Run(budget, budget_scale, Path(out).expanduser(), threads, rerun, time.perf_counter(), _Stages(8), 0)
    run.out.mkdir(parents=True, exist_ok=True)
    say(
        f"selkd-demo: {budget.name} budget{f' x{budget_scale:g}' if budget_scale != 1 else ''}, {threads} "
        f"thread(s), output {run.out}"
    )
    corpus = _corpus_stage(run, data, text_field)  # 1
    pre = _tokenizer_stage(run, corpus, models)  # 2
    base_dir = _base_student_stage(run, pre)  # 3: its step time tells how fast this machine is
    teacher_dir = _teacher_stage(run, pre)  # 4
    caches = _cache_stage(run, corpus, teacher_dir, base_dir)  # 5
    eval_seqs = _held_out(caches["full"].path, corpus.eval_fraction)
    runs = _students_stage(run, corpus, teacher_dir, base_dir, caches)  # 6
    rows = _evaluation_stage(run, pre, teacher_dir, base_dir, caches, runs, eval_seqs)  # 7
    return _report_stage(run, corpus, pre, teacher_dir, base_dir, caches, rows, len(eval_seqs))  # 8


# ----------------------------------------------------------------------------- 1. corpus


def _corpus_stage(run: _Run, data: Sequence[str] | None, text_field: str) -> _Corpus:
    from selkd.cache.documents import DataError

    budget = run.budget
    with run.stages.stage("corpus", "corpus"):
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
        data_dir = run.out / "data"
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
    # The held-out split, estimated from characters, so that it is known before anything is tokenized and
    # stays a pure function of the corpus files: it is part of every later stage's identity.
    n_kd_seq_estimate = max(2.0, kd_chars / (cpt * budget.seq_len))
    eval_fraction = min(0.5, round(budget.eval_sequences / n_kd_seq_estimate, 4))
    return _Corpus(corpus_name, kd_rows, extra_rows, kd_path, extra_path, kd_hash, extra_hash, cpt, eval_fraction)


# ----------------------------------------------------------------------------- 2. tokenizer, 3. base, 4. teacher


class _Pretraining:
    """The tokenizer and the models pretrained from nothing (the base student, the teacher), kept under
    ``home`` (``--models``) keyed by their inputs; both train on the same pool of sequences."""

    def __init__(self, run: _Run, corpus: _Corpus, tokenizer: Any, tok_key: dict[str, Any], home: Path) -> None:
        self.run, self.corpus, self.tokenizer, self.home = run, corpus, tokenizer, home
        budget = run.budget
        self.split_key = {
            "tokenizer": tok_key,
            "seq_len": budget.seq_len,
            "eval_fraction": corpus.eval_fraction,
            "seed": SEED,
        }
        self.records: dict[str, dict[str, Any]] = {}  # "base", "teacher": the training record, reused or not
        self._pool: np.ndarray | None = None

    def pool(self) -> np.ndarray:
        """[N, seq_len] training sequences for teacher and base: the KD corpus minus its held-out
        sequences (the caches' eval split), plus the pretraining-only text. Tokenized only when a model
        has to be trained."""
        from selkd.cache.corpus import eval_mask, load_corpus

        if self._pool is None:
            seq_len, c = self.run.budget.seq_len, self.corpus
            kd = load_corpus([str(c.kd_path)], self.tokenizer, seq_len, progress=False)
            held = eval_mask(kd.n_sequences, c.eval_fraction, SEED)
            parts = [np.stack([kd.sequence(i) for i in np.flatnonzero(~held) if len(kd.sequence(i)) == seq_len])]
            if c.extra_rows:
                extra = load_corpus([str(c.extra_path)], self.tokenizer, seq_len, progress=False)
                parts.append(_pack(extra.tokens, seq_len))
            self._pool = np.concatenate(parts).astype(np.int32)
        return self._pool

    def release_pool(self) -> None:
        self._pool = None

    def train(
        self, what: str, shape: Shape, seconds: float, lr: float, seed: int, plan: Callable[[], float] | None = None
    ) -> Path:
        """Train (or reuse) one model. ``seconds`` is the nominal budget, part of the model's identity;
        ``plan`` may lower the budget actually spent when the run is late (a busy machine)."""
        budget = self.run.budget
        key = {
            "split": self.split_key,
            "shape": dataclasses.asdict(shape),
            "seconds": seconds,
            "lr": lr,
            "batch": budget.pretrain_batch,
            "seed": seed,
        }
        directory = self.home / f"{what}-{digest(key, 8)}"

        def build() -> tuple[Any, dict[str, Any]]:
            pool = self.pool()
            model = make_llama(shape, len(self.tokenizer), budget.seq_len, seed, **special_ids(self.tokenizer))
            spend = seconds if plan is None else plan()
            say(
                f"      {n_params(model) / 1e6:.2f}M params ({shape.describe()}); {spend:.0f} s of CE on "
                f"{pool.size:,} tokens, batch {budget.pretrain_batch} x {budget.seq_len}, lr {lr:g}"
            )
            reset_peak_memory()
            rec = pretrain_lm(model, pool, spend, budget.pretrain_batch, lr, seed)
            rec.update(budget_seconds=spend, peak_mb=peak_memory_mb(), params=n_params(model))
            return model, rec

        record, reused = _ensure_model(what, directory, key, build, self.tokenizer)
        say(
            f"      {'reused' if reused else 'trained'}: {record['steps']:,} steps, {record['tokens'] / 1e6:.2f}M "
            f"tokens in {record['seconds']:.0f} s, final train CE {record['curve'][-1][2]:.3f} -> {directory}"
        )
        self.records[what] = {**record, "reused": reused}
        return directory

    def plan_teacher(self) -> float:
        """The teacher's budget: nominal, unless the base student's pretraining shows a machine so slow
        (or busy) that the stages after the teacher, whose cost is fixed in steps, would push the first run
        past its target; then somewhat less. Never under 3/4: the teacher's margin over the students is what
        makes the comparison mean anything, and on a busy machine it is already the first thing to shrink."""
        budget, base = self.run.budget, self.records["base"]
        step_s = base["seconds"] / max(1, base["steps"])
        a, b, c = budget.rest_cost
        kd_batches = budget.kd_tokens / (budget.pretrain_batch * budget.seq_len)
        rest = step_s * (a * budget.kd_steps + b * kd_batches + c)
        left = budget.target_seconds - (time.perf_counter() - self.run.t_start) - rest
        spend = min(budget.teacher_seconds, max(0.75 * budget.teacher_seconds, left))
        if spend < budget.teacher_seconds:
            say(
                f"      this machine is slower than planned ({step_s * 1000:.0f} ms per base-student step): the "
                f"teacher trains {spend:.0f} s instead of {budget.teacher_seconds:.0f} s to keep the run near "
                f"{budget.target_seconds / 60:.0f} minutes"
            )
        return spend


def _tokenizer_stage(run: _Run, corpus: _Corpus, models: str | None) -> _Pretraining:
    from selkd.cache.teacher import load_tokenizer

    budget = run.budget
    with run.stages.stage("tokenizer", f"tokenizer: byte-level BPE, {budget.vocab:,} tokens"):
        tok_key = {
            "kd": corpus.kd_hash,
            "extra": corpus.extra_hash,
            "vocab": budget.vocab,
            "chars": budget.tokenizer_chars,
        }
        home = _models_root(models) / f"demo-{digest(tok_key)}"
        tok_dir = home / "tokenizer"
        if read_json(tok_dir / "selkd-demo.json") == {"key": tok_key}:
            tokenizer = load_tokenizer(str(tok_dir))
            say(f"      reused {tok_dir}")
        else:
            sample, size = [], 0
            for row in (*corpus.kd_rows, *corpus.extra_rows):
                if size >= budget.tokenizer_chars:
                    break
                sample.append(row)
                size += len(row)
            if tok_dir.exists():
                shutil.rmtree(tok_dir)
            tokenizer = train_tokenizer(sample, budget.vocab, tok_dir)
            write_json(tok_dir / "selkd-demo.json", {"key": tok_key})
            say(f"      trained on {human_bytes(size)} -> {tok_dir} ({len(tokenizer):,} tokens)")
    return _Pretraining(run, corpus, tokenizer, tok_key, home)


def _base_student_stage(run: _Run, pre: _Pretraining) -> Path:
    """The base student, then the KD steps fitted to this machine's speed (its step time)."""
    budget = run.budget
    with run.stages.stage(
        "base", f"base student: Llama {budget.student.describe()}, {budget.base_seconds:.0f} s of plain CE"
    ):
        base_dir = pre.train("base", budget.student, budget.base_seconds, budget.base_lr, SEED + 1)
        run.nominal_kd_steps = budget.kd_steps
        run.budget = plan_kd_steps(budget, pre.records["base"])
        if run.budget.kd_steps != budget.kd_steps:
            say(
                f"      this machine is slower than the one the budget was sized on: the students will train "
                f"{run.budget.kd_steps} steps instead of {budget.kd_steps} (all methods alike)"
            )
    return base_dir


def _teacher_stage(run: _Run, pre: _Pretraining) -> Path:
    budget = run.budget
    with run.stages.stage(
        "teacher", f"teacher: Llama {budget.teacher.describe()}, up to {budget.teacher_seconds:.0f} s"
    ):
        teacher_dir = pre.train(
            "teacher", budget.teacher, budget.teacher_seconds, budget.teacher_lr, SEED, pre.plan_teacher
        )
    pre.release_pool()
    return teacher_dir


# ----------------------------------------------------------------------------- 5. caches


@dataclass
class _Cache:
    path: Path
    stats: dict[str, Any]  # the stamp: its key (inputs) and what info says about it


def _cache_stage(run: _Run, corpus: _Corpus, teacher_dir: Path, base_dir: Path) -> dict[str, _Cache]:
    """``full`` (every sequence) and ``sel20`` (the top SAMPLE_RATIO by the base student's entropy)."""
    from selkd.cache.config import BuildConfig

    budget = run.budget
    caches: dict[str, _Cache] = {}
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
            caches[name] = _Cache(path, _build_cache(run, name, cfg, command, key))
    return caches


def _build_cache(run: _Run, name: str, cfg: Any, command: str, key: dict[str, Any]) -> dict[str, Any]:
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


def _held_out(cache: Path, eval_fraction: float) -> list[np.ndarray]:
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


# ----------------------------------------------------------------------------- 6. students


def _students_stage(
    run: _Run, corpus: _Corpus, teacher_dir: Path, base_dir: Path, caches: dict[str, _Cache]
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


def _train_student(run: _Run, m: Method, cfg: Any, command: str, key: dict[str, Any]) -> dict[str, Any]:
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


# ----------------------------------------------------------------------------- 7. evaluation


def _evaluation_stage(
    run: _Run,
    pre: _Pretraining,
    teacher_dir: Path,
    base_dir: Path,
    caches: dict[str, _Cache],
    runs: dict[str, dict[str, Any]],
    eval_seqs: list[np.ndarray],
) -> list[Row]:
    """Held-out CE and top-1 agreement with the teacher of the teacher, the base and every student."""
    from selkd.cache.teacher import load_causal_lm

    rows: list[Row] = []
    with run.stages.stage("evaluate", f"evaluation: {len(eval_seqs)} held-out sequences, teacher, base and students"):
        teacher = load_causal_lm(str(teacher_dir), "cpu", torch.float32)
        t_ce, _, t_top = score_sequences(teacher, eval_seqs)
        del teacher
        for what, label in (("teacher", "teacher"), ("base", "base student (start of every method)")):
            rec = pre.records[what]
            if what == "teacher":
                ce, agree = t_ce, None
            else:
                ce, agree, _ = score_sequences(load_causal_lm(str(base_dir), "cpu", torch.float32), eval_seqs, t_top)
            label = f"{label} ({rec['params'] / 1e6:.2f}M, {rec['seconds']:.0f} s CE)"
            rows.append(_row(what, label, ce, agree, rec["seconds"], rec.get("peak_mb"), rec["reused"], rec["params"]))
        for m in METHODS:
            rec, run_out = runs[m.key], run.out / "runs" / m.key
            model = load_causal_lm(str(run_out / "final"), "cpu", torch.float32)
            ce, agree, _ = score_sequences(model, eval_seqs, t_top)
            stats = caches[m.cache].stats if m.kind == "cache" and m.uses_teacher and m.cache else None
            curve, eval_curve = read_metrics(run_out / "metrics.jsonl")
            row = _row(m.key, m.label, ce, agree, rec["wall_s"], rec["peak_mb"], rec["reused"], None, stats)
            row.curve, row.eval_curve = curve, [[0, rows[1].eval_ce], *eval_curve]
            rows.append(row)
        n_pos = sum(len(s) - 1 for s in eval_seqs)
        say(f"      teacher {rows[0].eval_ce:.3f}, base {rows[1].eval_ce:.3f} nats on {n_pos:,} positions")
    return rows


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


# ----------------------------------------------------------------------------- 8. report


def _report_stage(
    run: _Run,
    corpus: _Corpus,
    pre: _Pretraining,
    teacher_dir: Path,
    base_dir: Path,
    caches: dict[str, _Cache],
    rows: list[Row],
    n_eval: int,
) -> DemoResult:
    """The table, report.md, the plots and results.json; the table and the warnings are printed too."""
    run.warnings += _teacher_warnings(rows)
    table = format_table(rows)
    cache_stats = {name: c.stats for name, c in caches.items()}
    settings = _settings(run, corpus, pre, teacher_dir, base_dir, cache_stats, n_eval)
    with run.stages.stage("report", "report"):
        notes = [*run.warnings, *(_cache_note(n, s) for n, s in cache_stats.items())]
        plots, plot_note = make_plots(rows, pre.records, run.out)
        if plot_note:
            notes.append(plot_note)
        machine = machine_info(run.threads)
        stage_seconds = dict(run.stages.seconds)
        report = write_report(run.out, rows, table, settings, machine, stage_seconds, run.commands, plots, notes)
        total = time.perf_counter() - run.t_start
        result = DemoResult(rows, table, report, plots, settings, stage_seconds, total, run.warnings)
        results = {
            "rows": [dataclasses.asdict(r) for r in rows],
            "settings": settings,
            "machine": machine,
            "stage_seconds": stage_seconds,
            "total_seconds": total,
            "warnings": run.warnings,
        }
        write_json(run.out / "results.json", results)
    say("")
    say(table)
    for w in run.warnings:
        say(f"warning: {w}")
    say(f"\nreport: {report}   (total {fmt_s(time.perf_counter() - run.t_start)})")
    return result


def _teacher_warnings(rows: Sequence[Row], margin: float = 0.1) -> list[str]:
    """A warning for each student the teacher is not clearly (``margin`` nats) better than."""
    by_key = {r.key: r for r in rows}
    teacher = by_key["teacher"].eval_ce
    return [
        f"the teacher ({teacher:.3f}) is not clearly better than the {other} student "
        f"({by_key[other].eval_ce:.3f}) on held-out CE, so the comparison says little: the time-budgeted "
        "teacher trained too little (a slow or busy machine, --quick or --budget-scale below 1; the full demo "
        "trains a stronger one)"
        for other in ("base", "ce-only")
        if teacher > by_key[other].eval_ce - margin
    ]


def _cache_note(name: str, s: dict[str, Any]) -> str:
    return (
        f"Cache `{name}`: {s['sequences_train']:,} training sequences, {human_bytes(s['bytes'])}, built in "
        f"{s['seconds']:.0f} s ({s['mean_unique_ids'] or 0:.1f} unique ids per position, teacher entropy "
        f"{s['mean_teacher_entropy'] or 0:.2f} nats)."
    )


def _settings(
    run: _Run,
    corpus: _Corpus,
    pre: _Pretraining,
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


def _complete(path: Path) -> bool:
    """Whether ``path`` holds a finalized cache (every part committed)."""
    from selkd.cache.reader import CacheError, open_cache

    try:
        return open_cache(str(path)).summary is not None
    except (CacheError, OSError, ValueError):
        return False

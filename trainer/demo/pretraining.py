"""Stages 2-4 of the demo: the tokenizer and the models pretrained from nothing (base student, teacher),
kept for reuse under ``--models`` keyed by their inputs."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from selkd.trainer.demo.machine import peak_memory_mb, reset_peak_memory
from selkd.trainer.demo.models import make_llama, n_params, pretrain_lm, save_model, special_ids, train_tokenizer
from selkd.trainer.demo.settings import SEED, Shape, plan_kd_steps
from selkd.trainer.demo.state import Corpus, Run
from selkd.trainer.demo.util import digest, human_bytes, read_json, say, write_json


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


class Pretraining:
    """The tokenizer and the models pretrained from nothing (the base student, the teacher), kept under
    ``home`` (``--models``) keyed by their inputs; both train on the same pool of sequences."""

    def __init__(self, run: Run, corpus: Corpus, tokenizer: Any, tok_key: dict[str, Any], home: Path) -> None:
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


def tokenizer_stage(run: Run, corpus: Corpus, models: str | None) -> Pretraining:
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
    return Pretraining(run, corpus, tokenizer, tok_key, home)


def base_student_stage(run: Run, pre: Pretraining) -> Path:
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


def teacher_stage(run: Run, pre: Pretraining) -> Path:
    budget = run.budget
    with run.stages.stage(
        "teacher", f"teacher: Llama {budget.teacher.describe()}, up to {budget.teacher_seconds:.0f} s"
    ):
        teacher_dir = pre.train(
            "teacher", budget.teacher, budget.teacher_seconds, budget.teacher_lr, SEED, pre.plan_teacher
        )
    pre.release_pool()
    return teacher_dir

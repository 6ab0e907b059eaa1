"""The demo's pipeline: one function per stage (corpus, tokenizer, base student, teacher, caches,
students, evaluation, report), each in its own module; see the package docstring for why it is built
this way."""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from selkd.trainer.demo.caches import cache_stage, held_out
from selkd.trainer.demo.corpus import split_documents, stdlib_documents, user_documents, write_rows
from selkd.trainer.demo.evaluation import evaluation_stage
from selkd.trainer.demo.machine import default_threads
from selkd.trainer.demo.pretraining import base_student_stage, teacher_stage, tokenizer_stage
from selkd.trainer.demo.report import DemoResult
from selkd.trainer.demo.settings import BUDGETS, SAMPLE_RATIO
from selkd.trainer.demo.state import Corpus, Run, Stages
from selkd.trainer.demo.students import students_stage
from selkd.trainer.demo.summary import report_stage
from selkd.trainer.demo.util import human_bytes, say


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
    budget = BUDGETS["quick" if quick else "full"].scaled(budget_scale)
    run = Run(budget, budget_scale, Path(out).expanduser(), threads, rerun, time.perf_counter(), Stages(8), 0)
    run.out.mkdir(parents=True, exist_ok=True)
    say(
        f"selkd-demo: {budget.name} budget{f' x{budget_scale:g}' if budget_scale != 1 else ''}, {threads} "
        f"thread(s), output {run.out}"
    )
    corpus = _corpus_stage(run, data, text_field)  # 1
    pre = tokenizer_stage(run, corpus, models)  # 2
    base_dir = base_student_stage(run, pre)  # 3: its step time tells how fast this machine is
    teacher_dir = teacher_stage(run, pre)  # 4
    caches = cache_stage(run, corpus, teacher_dir, base_dir)  # 5
    eval_seqs = held_out(caches["full"].path, corpus.eval_fraction)
    runs = students_stage(run, corpus, teacher_dir, base_dir, caches)  # 6
    evaluated = evaluation_stage(run, pre, teacher_dir, base_dir, caches, runs, eval_seqs)  # 7
    return report_stage(run, corpus, pre, teacher_dir, base_dir, caches, evaluated, len(eval_seqs))  # 8


# ----------------------------------------------------------------------------- 1. corpus


def _corpus_stage(run: Run, data: Sequence[str] | None, text_field: str) -> Corpus:
    from selkd.cache.errors import DataError

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
    return Corpus(corpus_name, kd_rows, extra_rows, kd_path, extra_path, kd_hash, extra_hash, cpt, eval_fraction)

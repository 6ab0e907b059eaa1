"""``selkd-demo``: the whole selective-distillation story on one CPU, from nothing to a report.

Why a demo needs this much machinery: distillation only means something when the teacher is clearly
better than the student would be without it, and when every compared method starts from the same
capable student and sees the same data. So the demo

1. takes a corpus (the running interpreter's standard library by default: real text that exists on
   every machine, nothing downloaded; ``--data`` for your own text) and splits it into the KD corpus
   (the caches and the students use it; its held-out split is the cache's eval split) and extra text
   that only pretraining sees;
2. trains a byte-level BPE tokenizer, a Llama-style teacher and the *base student* (the student
   architecture pretrained briefly with plain CE), all with time budgets, and keeps them as Hugging
   Face directories under ``--models`` (default ``~/.cache/selkd``), keyed by the corpus and the
   settings, so later runs reuse them. Neither ever sees a held-out sequence;
3. builds two caches with ``selkd-cache build`` (``sample:50``: every sequence, and the top 20% of
   sequences by the base student's entropy);
4. continues the base student for the same number of steps on the same data with each method: CE
   only, full KD with the teacher online, full KD from the cache, SE-KD (student entropy, 20% of
   positions) and SE-KD 3X (positions + sampled classes + 20% of samples);
5. scores the teacher, the base student and every trained student on the same held-out sequences
   and writes one table, ``report.md`` and loss curves into ``--out``.

The cache builds and trainings run in this process through the same functions as ``selkd-cache
build`` and ``selkd-train`` (one Python start-up instead of six, which matters on 2 cores); the demo
prints the equivalent command of each. Every stage reuses its earlier result when its inputs are
identical; ``--rerun`` retrains the compared students.

Budgets: the teacher and the base student train for a number of *seconds*, the compared students for
a number of *steps* (the same for all). The base student trains first, and its step time tells how fast
the machine is: on one slower than the 2 shared cores the budgets were sized on, the KD steps shrink in
proportion (:func:`plan_kd_steps`) and, if the run is still late, the teacher's seconds a little, so the
first run keeps its wall time and the teacher keeps its lead over the CE-only student.

The CE-only baseline is ``selkd-train --kd-weight 0 --ce-weight 1 --select none`` on the full cache: the
same batches in the same order as the cache-based KD runs, with the teacher's targets read and unused.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["BUDGETS", "Budget", "DemoResult", "Row", "Shape", "build_parser", "main", "plan_kd_steps", "run_demo"]

# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Shape:
    """A Llama-style architecture (the vocabulary comes from the tokenizer)."""

    hidden: int
    layers: int
    heads: int
    intermediate: int

    def describe(self) -> str:
        return f"hidden {self.hidden}, {self.layers} layers, {self.heads} heads, MLP {self.intermediate}"


@dataclass(frozen=True)
class Budget:
    """Everything that sizes a demo run. Time budgets (seconds) make the first run's wall time
    predictable on any machine; step budgets keep the compared methods on equal footing."""

    name: str
    vocab: int  # BPE vocabulary, special tokens included
    seq_len: int  # tokens per packed sequence (pretraining, caches and students)
    kd_tokens: int  # size of the KD corpus (caches, students, held-out split)
    extra_tokens: int  # more text that only teacher / base pretraining reads
    tokenizer_chars: int  # characters the BPE is trained on
    eval_sequences: int  # held-out sequences (sets the caches' --eval-fraction)
    teacher: Shape
    student: Shape
    teacher_seconds: float
    base_seconds: float
    pretrain_batch: int
    teacher_lr: float
    base_lr: float
    kd_steps: int
    kd_batch: int
    kd_lr: float
    warmup_steps: int
    evals: int  # held-out evaluations per student run (for the curves), the final one included
    target_seconds: float  # the first run's wall-time goal: the teacher's budget shrinks to meet it
    # cost of everything after the teacher (caches, students, evaluation, report, start-up), in base-student
    # pretraining steps: per KD step (all methods together), per KD-corpus batch, fixed. Measured on 2 cores.
    rest_cost: tuple[float, float, float]
    # base-student pretraining step time (s) of the machine the budget was sized on (2 shared cores); on a
    # slower machine the KD steps shrink in proportion, see plan_kd_steps
    ref_step_s: float
    cache_batch: int = 8

    def scaled(self, scale: float) -> Budget:
        """The same plan with every time, step and data budget multiplied by ``scale`` (with floors
        that keep each stage meaningful): how the tests run the whole pipeline in seconds."""
        if scale == 1.0:
            return self

        def n(x: int, lo: int) -> int:
            return max(lo, round(x * scale))

        kd_steps = n(self.kd_steps, 2)
        return dataclasses.replace(
            self,
            # SE-KD 3X needs a batch of sequences after keeping 20%: 6 batches' worth of sequences plus eval
            kd_tokens=n(self.kd_tokens, self.seq_len * (self.kd_batch * 6 + 16)),
            extra_tokens=n(self.extra_tokens, 0),
            tokenizer_chars=n(self.tokenizer_chars, 100_000),
            eval_sequences=n(self.eval_sequences, 4),
            teacher_seconds=max(1.0, self.teacher_seconds * scale),
            base_seconds=max(0.5, self.base_seconds * scale),
            kd_steps=kd_steps,
            warmup_steps=min(self.warmup_steps, max(0, kd_steps // 4)),
            evals=min(self.evals, kd_steps),
            target_seconds=self.target_seconds * scale,
        )


BUDGETS: dict[str, Budget] = {
    # First run <= 15 minutes on a 2-core CPU, later runs well under 8.
    "full": Budget(
        name="full",
        vocab=4096,
        seq_len=256,
        kd_tokens=300_000,
        extra_tokens=1_800_000,
        tokenizer_chars=4_000_000,
        eval_sequences=48,
        teacher=Shape(hidden=96, layers=4, heads=4, intermediate=256),
        student=Shape(hidden=64, layers=2, heads=2, intermediate=192),
        teacher_seconds=360.0,
        base_seconds=50.0,
        pretrain_batch=8,
        teacher_lr=3e-3,
        base_lr=3e-3,
        kd_steps=120,
        kd_batch=8,
        kd_lr=1e-3,
        warmup_steps=8,
        evals=4,
        target_seconds=840.0,
        rest_cost=(10.0, 1.9, 90.0),
        ref_step_s=0.24,
    ),
    # <= 4 minutes on a 2-core CPU from an empty cache directory: same stages, smaller everything.
    "quick": Budget(
        name="quick",
        vocab=2048,
        seq_len=256,
        kd_tokens=90_000,
        extra_tokens=700_000,
        tokenizer_chars=1_500_000,
        eval_sequences=24,
        teacher=Shape(hidden=96, layers=3, heads=4, intermediate=256),
        student=Shape(hidden=64, layers=2, heads=2, intermediate=192),
        teacher_seconds=60.0,
        base_seconds=15.0,
        pretrain_batch=8,
        teacher_lr=3e-3,
        base_lr=3e-3,
        kd_steps=40,
        kd_batch=8,
        kd_lr=1e-3,
        warmup_steps=4,
        evals=4,
        target_seconds=225.0,
        rest_cost=(18.5, 4.5, 120.0),
        ref_step_s=0.125,
    ),
}


def plan_kd_steps(budget: Budget, base_record: dict[str, Any]) -> Budget:
    """The budget with its KD steps fitted to this machine's speed, read off the base student's
    pretraining (its step time). Why: the teacher and base are time-budgeted, so on a slow or busy machine
    they get less compute on their own, but fixed KD steps would not, which both breaks the wall-time goal
    and hands the CE-only student a larger share of compute than the teacher's, until the teacher is no
    longer clearly better. Scaling the steps by the slowdown keeps both. Every method still trains the same
    number of steps, and later runs get the same plan (it depends only on the saved base record)."""
    step_s = base_record["seconds"] / max(1, base_record["steps"])
    slowdown = step_s / budget.ref_step_s
    if slowdown <= 1.25:
        return budget
    steps = max(min(budget.kd_steps, 8), round(budget.kd_steps / slowdown))
    evals = min(steps, max(2, round(budget.evals / slowdown)))  # evaluations cost the same per run
    return dataclasses.replace(budget, kd_steps=steps, warmup_steps=min(budget.warmup_steps, steps // 4), evals=evals)


SEED = 0
CHUNK_CHARS = 4000  # corpus rows: pieces of at most this many characters, cut at line ends
CLASSES = "sample:50"  # RS-KD targets, as in the paper
SELECT = "student-entropy:0.2"  # SE-KD: top 20% of positions by student entropy
SAMPLE_RATIO = 0.2  # SE-KD 3X: top 20% of sequences by the base student's mean entropy
STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"})
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"


@dataclass(frozen=True)
class Method:
    """One compared student: how ``selkd-train`` trains it (``kind``: teacher ``online`` or from a ``cache``)."""

    key: str
    label: str
    kind: str  # "online" or "cache"
    select: str = "none"
    cache: str | None = None  # "full" or "sel20"
    kd_weight: float = 1.0  # 0 with ce_weight 1: plain CE, the teacher unused
    ce_weight: float = 0.0

    @property
    def uses_teacher(self) -> bool:
        return self.kd_weight > 0


METHODS: tuple[Method, ...] = (
    Method("ce-only", "CE only (no teacher)", "cache", cache="full", kd_weight=0.0, ce_weight=1.0),
    Method("kd-online", "full KD, teacher online", "online"),
    Method("kd-cache", "full KD from the cache", "cache", cache="full"),
    Method("sekd", "SE-KD (student entropy, 20%)", "cache", SELECT, cache="full"),
    Method("sekd-3x", "SE-KD 3X (+ sampled classes, 20% samples)", "cache", SELECT, cache="sel20"),
)


# ----------------------------------------------------------------------------- small helpers


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _digest(obj: Any, n: int = 12) -> str:
    """A short, stable hash of a JSON-able object: the identity of a stage's inputs."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj: Any) -> None:
    """Write atomically, so an interrupted run never leaves a stamp that claims a finished stage."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def busy_cores(samples: int = 10, interval_s: float = 0.05) -> float | None:
    """How many other processes are running right now: the mean of ``/proc/loadavg``'s runnable count
    (minus this process) over half a second. The 1-minute load average would lag by a minute and count
    what this process itself just did (a second run right after a first would see a busy machine)."""
    counts = []
    for i in range(samples):
        try:
            running = Path("/proc/loadavg").read_text().split()[3].split("/")[0]
        except (OSError, IndexError):
            return None
        counts.append(int(running) - 1)
        if i + 1 < samples:
            time.sleep(interval_s)
    return sum(counts) / len(counts)


def default_threads() -> int:
    """Torch threads: the cores other processes leave idle when the demo starts, minus one, at least 1.

    Why not all cores: on a shared machine, OpenMP threads wait for each other at every barrier while the
    scheduler runs someone else. Measured on 2 shared cores: 2 threads on an idle machine were 1.6-1.8x
    faster than 1 for these models, but when a neighbour's job started mid-run a 40-step KD run took
    149 s instead of 17 s. One core is left free because the demo cannot know who starts next."""
    cores = usable_cores()
    busy = busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            busy = 0.0
    return max(1, min(cores - 1, math.floor(cores - busy + 0.5)))


def reset_peak_memory() -> bool:
    """Reset this process's peak RSS (Linux ``clear_refs``), so the next reading is the peak of one
    stage, not of the whole demo; False where that is not possible (the reading is then cumulative).
    Freed heap memory is handed back to the OS first (``malloc_trim``), so what earlier stages freed
    does not count towards the next one."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_mb() -> float:
    """Peak RSS of this process since the last reset (the trainer's own CPU measure)."""
    from selkd.trainer.loop import memory_mb

    return float(memory_mb(torch.device("cpu")))


@contextlib.contextmanager
def _logged(path: Path) -> Iterator[None]:
    """Send a stage's own output (the trainer's and builder's log lines) to a file, keeping the
    demo's console to one line per event; the file is named if the stage fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def _as_cli(prog: str, cfg: Any, defaults: Any, always: Sequence[str] = ()) -> str:
    """The command line that runs ``cfg`` (options that differ from ``defaults``, and ``always``), so
    users can repeat a stage by hand."""
    parts = [prog]
    for f in dataclasses.fields(cfg):
        if not f.metadata or not f.metadata.get("cli", True):
            continue
        value, default = getattr(cfg, f.name), getattr(defaults, f.name)
        if (value == default and f.name not in always) or value in (None, [], {}):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else f"{flag} false")
        elif isinstance(value, list):
            parts.append(f"{flag} " + " ".join(str(v) for v in value))
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


# ----------------------------------------------------------------------------- corpus


def stdlib_documents() -> list[tuple[str, str]]:
    """``(relative path, source)`` of the interpreter's standard-library ``.py`` files, test suites,
    IDLE and installed packages excluded: real text present on every machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS)
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    out = []
    for p in sorted(found, key=lambda p: p.relative_to(root).as_posix()):
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            out.append((p.relative_to(root).as_posix(), text))
    return out


def user_documents(specs: Sequence[str], text_field: str, max_chars: int | None = None) -> list[tuple[str, str]]:
    """Documents of ``--data`` (the formats ``selkd-cache build`` reads), named by position. Reading
    stops after ``max_chars``: the demo uses a few MB, however large the corpus. Chat rows are refused
    (their rendering needs a tokenizer with a chat template, and the demo trains its own)."""
    from selkd.cache.corpus import CorpusStats, iter_documents

    stats = CorpusStats(text_field=text_field)
    out: list[tuple[str, str]] = []
    total = 0
    for doc in iter_documents(list(specs), text_field, None, stats):  # type: ignore[arg-type]
        if doc.strip():
            out.append((f"doc{len(out)}", doc))
            total += len(doc)
            if max_chars is not None and total >= max_chars:
                break
    return out


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Split at line ends into pieces of at most ``max_chars`` (a longer line is its own piece), so a
    corpus row is never one 100 KB module."""
    pieces: list[str] = []
    cur: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        if cur and size + len(line) > max_chars:
            pieces.append("".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += len(line)
    if cur:
        pieces.append("".join(cur))
    return [p for p in pieces if p.strip()]


def split_documents(docs: Sequence[tuple[str, str]], kd_chars: int, extra_chars: int) -> tuple[list[str], list[str]]:
    """Rows of the KD corpus (about ``kd_chars``) and of the pretraining-only text (about
    ``extra_chars``). Documents are shuffled by a hash of their name (deterministic, and the KD corpus
    is not one package's alphabetical prefix) and cut into rows at line ends; a document's rows stay in
    order, so sequences keep their context, and only the document at the boundary is split."""
    order = sorted(docs, key=lambda d: hashlib.sha1(d[0].encode()).hexdigest())
    kd: list[str] = []
    extra: list[str] = []
    kd_size = extra_size = 0
    for _, text in order:
        for row in chunk_text(text, CHUNK_CHARS):
            if kd_size < kd_chars:
                kd.append(row)
                kd_size += len(row)
            elif extra_size < extra_chars:
                extra.append(row)
                extra_size += len(row)
            else:
                return kd, extra
    return kd, extra


def write_rows(path: Path, rows: Sequence[str]) -> str:
    """Write ``{"text": ...}`` rows unless the file already holds exactly them; returns their hash."""
    body = "".join(json.dumps({"text": r}, ensure_ascii=False) + "\n" for r in rows).encode()
    digest = hashlib.sha256(body).hexdigest()
    try:
        same = path.stat().st_size == len(body) and hashlib.sha256(path.read_bytes()).hexdigest() == digest
    except OSError:
        same = False
    if not same:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(body)
        tmp.replace(path)
    return digest


# ----------------------------------------------------------------------------- tokenizer and models


def train_tokenizer(texts: Sequence[str], vocab: int, out_dir: Path) -> Any:
    """A byte-level BPE (no unknown tokens; ``<|endoftext|>`` is eos and bos, ``<|pad|>`` pad), saved
    with ``save_pretrained`` so every selkd command loads it like any Hugging Face tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN, model_max_length=1 << 30
    )
    fast.save_pretrained(str(out_dir))
    return fast


def make_llama(shape: Shape, tokenizer: Any, max_pos: int, seed: int) -> Any:
    """A randomly initialised Llama (same arguments, same weights; the global RNG is left alone)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=max_pos,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def pretrain_lm(
    model: torch.nn.Module,
    pool: np.ndarray,
    seconds: float,
    batch: int,
    lr: float,
    seed: int,
    warmup: int = 20,
    min_lr_ratio: float = 0.1,
    report: Callable[[str], None] = _say,
) -> dict[str, Any]:
    """Plain next-token CE for ``seconds`` of wall time on random rows of ``pool`` ([N, L] tokens).

    Time-budgeted rather than step-budgeted, so that the first run's duration is the same on any
    machine; the learning rate follows a cosine over *elapsed time* (after ``warmup`` steps), so the
    run always ends annealed. Returns the loss curve and what was spent."""
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    curve: list[list[float]] = []
    step, tokens, window, n_window = 0, 0, 0.0, 0
    t0 = time.perf_counter()
    next_report = t0 + 15.0
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and step > 0:
            break
        progress = min(1.0, elapsed / seconds)
        scale = min(1.0, (step + 1) / warmup) * (
            min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        )
        for group in opt.param_groups:
            group["lr"] = lr * scale
        x = torch.from_numpy(pool[rng.integers(0, len(pool), batch)].astype(np.int64))
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += x.numel()
        window += float(loss.detach())
        n_window += 1
        if step % 10 == 0:
            curve.append([step, time.perf_counter() - t0, window / n_window])
            window, n_window = 0.0, 0
        if time.perf_counter() >= next_report:
            last = curve[-1][2] if curve else float(loss.detach())
            report(f"      {time.perf_counter() - t0:5.0f} s  step {step:>5}  train CE {last:.3f}")
            next_report += 15.0
    if n_window:
        curve.append([step, time.perf_counter() - t0, window / n_window])
    model.eval()
    return {"steps": step, "tokens": tokens, "seconds": time.perf_counter() - t0, "curve": curve}


@torch.no_grad()
def score_sequences(
    model: torch.nn.Module, seqs: Sequence[np.ndarray], reference: Sequence[torch.Tensor] | None = None, batch: int = 16
) -> tuple[float, float | None, list[torch.Tensor]]:
    """Held-out CE (nats per next-token position) of ``model`` on ``seqs``, its top-1 agreement with
    ``reference`` (the teacher's argmax per position) and its own argmax per sequence.

    The same positions as the trainer's evaluation (every position that has a next token), scored
    the same way for teacher, base and trained students, so the table compares like with like."""
    model.eval()
    ce_sum, agree_sum, n = 0.0, 0.0, 0
    argmax: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    lengths = np.array([len(s) for s in seqs])
    for length in np.unique(lengths):
        rows = np.flatnonzero(lengths == length)
        for s in range(0, len(rows), batch):
            idx = rows[s : s + batch]
            x = torch.from_numpy(np.stack([seqs[i] for i in idx]).astype(np.int64))
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            labels = x[:, 1:]
            ce = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
            )
            ce_sum += float(ce)
            n += labels.numel()
            top = logits.argmax(-1)
            for j, i in enumerate(idx):
                argmax[i] = top[j]
                if reference is not None:
                    agree_sum += float((top[j] == reference[i]).sum())
    ce_mean = ce_sum / max(n, 1)
    return ce_mean, (agree_sum / max(n, 1) if reference is not None else None), argmax


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
    eval_curve: list[list[float]] = field(default_factory=list)  # [step, held-out CE]


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


def format_table(rows: Sequence[Row]) -> str:
    """The table as aligned plain text (also valid Markdown)."""
    head = [
        "method",
        "held-out CE",
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
                f"{r.eval_ppl:.1f}",
                opt(r.top1_agree, ".3f"),
                _fmt_s(r.wall_s),
                opt(r.peak_mb, ",.0f") + (" MB" if r.peak_mb is not None else ""),
                "—" if r.cache_bytes is None else _human_bytes(r.cache_bytes),
                opt(r.bytes_per_position, ".1f"),
                opt(r.bytes_per_corpus_position, ".1f"),
                "—" if r.cache_build_s is None else _fmt_s(r.cache_build_s),
            ]
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        out = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "| " + " | ".join(out) + " |"

    sep = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), sep, *(line(b) for b in body)])


def read_metrics(path: Path) -> tuple[list[list[float]], list[list[float]]]:
    """([step, train loss], [step, held-out CE]) from a run's ``metrics.jsonl``."""
    train, ev = [], []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return train, ev
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("eval"):
            if "eval_ce" in row:
                ev.append([row["step"], row["eval_ce"]])
        elif "loss" in row:
            train.append([row["step"], row["loss"]])
    return train, ev


def make_plots(rows: Sequence[Row], pretrain: dict[str, dict[str, Any]], out: Path) -> tuple[list[Path], str | None]:
    """Loss curves as PNG: held-out CE per step and training loss per step of every compared student,
    and the teacher's and base student's pretraining CE. matplotlib is optional (``selkd[plots]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed (pip install 'selkd[plots]'), so the report has no plots"
    students = [r for r in rows if r.key not in ("teacher", "base")]
    ref = {r.key: r.eval_ce for r in rows if r.key in ("teacher", "base")}
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in students:
        if r.eval_curve:
            xs, ys = zip(*r.eval_curve)
            ax.plot(xs, ys, marker="o", ms=3, label=r.label)
    for key, style in (("teacher", ":"), ("base", "--")):
        if key in ref:
            ax.axhline(ref[key], color="grey", ls=style, lw=1, label=f"{key} ({ref[key]:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out CE (nats)")
    ax.set_title("Held-out cross-entropy of the students")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "eval_ce.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in students:
        if r.curve:
            xs, ys = zip(*r.curve)
            ax.plot(xs, ys, label=r.label)
    ax.set_xlabel("step")
    ax.set_ylabel("training objective")
    ax.set_title("Training loss (KD divergence; CE for the CE-only student)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "train_loss.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, info in pretrain.items():
        curve = info.get("curve") or []
        if curve:
            ax.plot([c[1] for c in curve], [c[2] for c in curve], label=f"{key} ({info['params'] / 1e6:.2f}M params)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("training CE (nats)")
    ax.set_title("Pretraining (time-budgeted, plain CE)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "pretrain_loss.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths, None


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = usable_cores()
    load = None
    with contextlib.suppress(OSError, AttributeError):
        load = round(os.getloadavg()[0], 2)
    import transformers

    return {
        "cpu": cpu or "unknown",
        "cores": cores,
        "torch_threads": threads,
        "load_average_1min": load,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }


def _vs(ce: float, ref: float) -> str:
    """'0.123 nats better than' / 'worse than' (lower held-out CE is better)."""
    d = ce - ref
    return f"{abs(d):.3f} nats {'better' if d < 0 else 'worse'} than"


def findings(rows: Sequence[Row]) -> list[str]:
    """Plain statements read off the table (no claims beyond these numbers and this budget)."""
    by = {r.key: r for r in rows}
    teacher, base, ce_only = by["teacher"], by["base"], by["ce-only"]
    students = [r for r in rows if r.key not in ("teacher", "base")]
    out = [
        f"The teacher is {_vs(teacher.eval_ce, base.eval_ce)} the base student and "
        f"{_vs(teacher.eval_ce, ce_only.eval_ce)} the CE-only student on held-out CE."
    ]
    ranked = sorted(students, key=lambda r: r.eval_ce)
    out.append(
        "Held-out CE, best first: "
        + "; ".join(f"{r.label} {r.eval_ce:.3f} ({r.eval_ce - base.eval_ce:+.3f} from the base)" for r in ranked)
        + "."
    )
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
) -> Path:
    """``OUT/report.md``: the table, what was compared and how, the machine, the curves."""
    b = settings["budget"]
    lines = [
        "# selkd demo report",
        "",
        f"Budget **{b['name']}**; corpus: {settings['corpus']}. Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.",
        "",
        table,
        "",
        "Held-out CE and perplexity are measured on the caches' eval split (never trained on by any model, "
        "teacher and base included); top-1 agreement is the share of those positions where the model's argmax "
        "is the teacher's. Wall time is pretraining time for the teacher and the base student and training "
        "time (load, steps, evaluations, save) for the compared students. "
        "Peak memory is the process's peak resident set during that stage. B/pos: cache bytes per stored "
        "position; B/corpus pos: per position of the KD corpus; cache build: the teacher pass (and, for the "
        "20% cache, the base student's scoring pass) that wrote the cache the method reads."
        + (" `*`: reused from an earlier run with identical inputs." if any(r.reused for r in rows) else ""),
        "",
    ]
    lines += ["## Findings", "", *(f"- {f}" for f in findings(rows)), ""]
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    lines += [
        "## What was compared",
        "",
        f"Every student starts from the same base checkpoint (the student architecture pretrained with plain CE "
        f"for {b['base_seconds']:.0f} s) and trains {b['kd_steps']} steps of {b['kd_batch']} x {b['seq_len']} tokens "
        f"at peak learning rate {b['kd_lr']:g} (AdamW, {b['warmup_steps']} warm-up steps, cosine decay), seed {SEED}.",
        "",
        "- **CE only**: next-token cross-entropy, no teacher (the demo's own loop over the full cache's training "
        "split, in the same batch order as the cache-based runs).",
        "- **full KD, teacher online**: forward KL to the teacher's exact distribution at every position, the "
        "teacher running in the loop.",
        f"- **full KD from the cache**: forward KL to RS-KD sampled targets ({CLASSES}) at every position.",
        f"- **SE-KD**: the same targets, only at the {float(SELECT.split(':')[1]):.0%} of positions per sequence "
        "with the highest student entropy (recomputed every step), no CE term.",
        f"- **SE-KD 3X**: SE-KD on a cache that holds only the top {SAMPLE_RATIO:.0%} of training sequences by the "
        "frozen base student's mean entropy (positions + classes + samples).",
        "",
        "## Settings",
        "",
        "```json",
        json.dumps(settings, indent=2, default=str),
        "```",
        "",
        "## Stage times (this run)",
        "",
        *(f"- {k}: {_fmt_s(v)}" for k, v in stage_seconds.items()),
        "",
        "## Machine",
        "",
        *(f"- {k}: {v}" for k, v in machine.items()),
        "",
        "## Commands",
        "",
        "The demo runs these stages in-process; each is equivalent to:",
        "",
        "```sh",
        *commands,
        "```",
        "",
    ]
    if plots:
        lines += ["## Curves", ""]
        for p in plots:
            lines += [f"![{p.stem}]({p.name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


# ----------------------------------------------------------------------------- the demo


class _Stages:
    """Numbered stage headings with their times."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.seconds = total, 0, {}
        self._name: str | None = None
        self._t0 = 0.0

    @contextlib.contextmanager
    def stage(self, name: str, title: str) -> Iterator[None]:
        self.n += 1
        _say(f"[{self.n}/{self.total}] {title}")
        t0 = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t0
        _say(f"      done in {_fmt_s(self.seconds[name])}")


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
    stamp = _read_json(stamp_path)
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
    _write_json(tmp / "selkd-demo.json", record)
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
    """Run the demo (see the module docstring); returns the table's rows and where the report is."""
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
    from selkd.cache.corpus import DataError, eval_mask, load_corpus
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
    _say(
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
        _say(
            f"      {corpus_name}: KD corpus {len(kd_rows):,} rows ({_human_bytes(kd_chars)}), pretraining-only "
            f"text {len(extra_rows):,} rows ({_human_bytes(extra_chars)}) -> {data_dir}"
        )

    # --- 2. tokenizer -------------------------------------------------------------------------------
    with stages.stage("tokenizer", f"tokenizer: byte-level BPE, {budget.vocab:,} tokens"):
        tok_key = {"kd": kd_hash, "extra": extra_hash, "vocab": budget.vocab, "chars": budget.tokenizer_chars}
        home = _models_root(models) / f"demo-{_digest(tok_key)}"
        tok_dir = home / "tokenizer"
        if _read_json(tok_dir / "selkd-demo.json") == {"key": tok_key}:
            tokenizer = load_tokenizer(str(tok_dir))
            _say(f"      reused {tok_dir}")
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
            _write_json(tok_dir / "selkd-demo.json", {"key": tok_key})
            _say(f"      trained on {_human_bytes(size)} -> {tok_dir} ({len(tokenizer):,} tokens)")

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
        directory = home / f"{what}-{_digest(key, 8)}"

        def build() -> tuple[Any, dict[str, Any]]:
            pool = pretraining_pool()
            model = make_llama(shape, tokenizer, max_pos=budget.seq_len, seed=seed)
            spend = seconds if plan is None else plan()
            _say(
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
        _say(
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
            _say(
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
            _say(
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
            command = _as_cli("selkd-cache build", cfg, BuildConfig(teacher="T", data=["D"], out="O"), ["classes"])
            commands.append(command)
            key = {"teacher": str(teacher_dir), "base": str(base_dir), "kd": kd_hash, "cfg": dataclasses.asdict(cfg)}
            stamp_path = path.with_name(path.name + ".selkd-demo.json")
            stamp = _read_json(stamp_path)
            if stamp is not None and stamp.get("key") == key and "bytes" in stamp and _complete(path):
                cache_stats[name] = stamp
                _say(f"      {name}: reused {path} (built in {stamp['seconds']:.0f} s)")
                continue
            if path.exists() and (stamp is None or stamp.get("key") != key):
                shutil.rmtree(path)  # built from other inputs: a build would refuse to resume it
            _write_json(stamp_path, {"key": key})  # same key next time: an interrupted build resumes
            _say(f"      {name}: {command}")
            t0 = time.perf_counter()
            with _logged(logs / f"cache-{name}.log"):
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
            _write_json(stamp_path, stamp)
            cache_stats[name] = stamp
            _say(
                f"      {name}: {info.sequences_train:,} train + {info.sequences_eval:,} held-out sequences, "
                f"{_human_bytes(info.bytes_on_disk)} ({info.bytes_per_stored_position or 0:.1f} B/position) in "
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
            command = _as_cli("selkd-train", cfg, defaults)
            commands.append(command)
            key = {
                "cfg": cfg.to_dict(),
                "teacher": str(teacher_dir),
                "cache": cache_stats[m.cache]["key"] if m.cache else None,
                "kind": m.kind,
            }
            stamp_path = run_out / "selkd-demo.json"
            stamp = _read_json(stamp_path)
            done = (run_out / "final" / "config.json").is_file()
            if not rerun and stamp is not None and stamp.get("key") == key and done:
                run_records[m.key] = {**stamp, "reused": True}
                _say(f"      {m.label}: reused {run_out} (trained in {stamp['wall_s']:.0f} s)")
                continue
            if run_out.exists():
                shutil.rmtree(run_out)
            _say(f"      {m.label} ...")
            reset_peak_memory()
            t0 = time.perf_counter()
            with _logged(logs / f"train-{m.key}.log"):
                _say(command)
                result = train(cfg)
            wall = time.perf_counter() - t0
            peak = peak_memory_mb()
            stamp = {"key": key, "wall_s": wall, "peak_mb": peak, "final": result.get("final"), "steps": result["step"]}
            _write_json(stamp_path, stamp)
            run_records[m.key] = {**stamp, "reused": False}
            _say(
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
        _say(f"      teacher {rows[0].eval_ce:.3f}, base {rows[1].eval_ce:.3f} nats on {n_pos:,} positions")

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
                f"Cache `{n}`: {s['sequences_train']:,} training sequences, {_human_bytes(s['bytes'])}, built in "
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
        _write_json(
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
    _say("")
    _say(table)
    for w in warnings:
        _say(f"warning: {w}")
    _say(f"\nreport: {report}   (total {_fmt_s(time.perf_counter() - t_start)})")
    return result


def _complete(path: Path) -> bool:
    """Whether ``path`` holds a finalized cache (every part committed)."""
    from selkd.cache.reader import CacheError, open_cache

    try:
        return open_cache(str(path)).summary is not None
    except (CacheError, OSError, ValueError):
        return False


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="selkd-demo",
        description="Train a tokenizer, a teacher and a base student on a corpus (the Python standard library by "
        "default), build caches, distil with CE only / full KD (online, cached) / SE-KD / SE-KD 3X, and write a "
        "table and a report with loss curves. Later runs reuse every stage whose inputs are unchanged.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smaller teacher and budgets, the same stages and table: under 4 minutes on 2 CPU cores from an empty "
        "cache (measured 2.5 on 2 shared cores); the full demo takes under 15 the first time (measured 11-12)",
    )
    p.add_argument(
        "--data",
        nargs="+",
        metavar="SPEC",
        help="your own corpus instead of the standard library: .txt/.jsonl/.jsonl.gz/.parquet files, directories, "
        "globs or a `datasets` save_to_disk directory (plain text rows)",
    )
    p.add_argument(
        "--text-field", default="text", help="field of .jsonl/.parquet rows that holds the text (default: text)"
    )
    p.add_argument(
        "--out",
        default="selkd-demo",
        metavar="DIR",
        help="where the corpus files, caches, training runs, report.md and plots go (default: ./selkd-demo)",
    )
    p.add_argument(
        "--models",
        metavar="DIR",
        help="where the tokenizer, teacher and base student are kept for reuse, under demo-<hash>/ "
        "(default: $XDG_CACHE_HOME/selkd or ~/.cache/selkd)",
    )
    p.add_argument(
        "--budget-scale",
        type=float,
        default=1.0,
        metavar="X",
        help="multiply every time, step and data budget by X (e.g. 0.05 for a smoke test; results then mean "
        "little) (default: 1)",
    )
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch CPU threads (default: the cores other processes leave idle when the demo starts, minus one, "
        "at least 1: on 2 cores, 1 thread; more threads win little for these tiny models and lose a lot when "
        "another job starts)",
    )
    p.add_argument(
        "--rerun",
        action="store_true",
        help="retrain the compared students even where an earlier run had identical inputs (the tokenizer, "
        "teacher, base student and caches are still reused)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    if not args.budget_scale > 0:
        print("selkd-demo: error: --budget-scale must be > 0", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print("selkd-demo: error: --threads must be >= 1", file=sys.stderr)
        return 2
    from selkd.cache.build import BuildError
    from selkd.cache.corpus import DataError
    from selkd.cache.options import ConfigError
    from selkd.cache.reader import CacheError
    from selkd.cache.store import StoreError
    from selkd.cache.teacher import ModelError
    from selkd.trainer.checkpoint import CheckpointError
    from selkd.trainer.loop import TrainError

    try:
        run_demo(
            quick=args.quick,
            data=args.data,
            text_field=args.text_field,
            out=args.out,
            models=args.models,
            budget_scale=args.budget_scale,
            threads=args.threads,
            rerun=args.rerun,
        )
    except (BuildError, CacheError, CheckpointError, ConfigError, DataError, ModelError, StoreError, TrainError) as err:
        print(f"selkd-demo: error: {err} (stage logs: {Path(args.out) / 'logs'})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "selkd-demo: interrupted; rerun the same command to continue (finished stages are reused)", file=sys.stderr
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

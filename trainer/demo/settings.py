"""The demo's budgets (full and --quick), the compared methods and the fixed settings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


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
    base_seconds: float  # long enough to bring the base student near its CE plateau: KD from it then means something
    pretrain_batch: int
    teacher_lr: float
    base_lr: float
    kd_steps: int
    kd_batch: int
    kd_lr: float
    warmup_steps: int
    evals: int  # held-out evaluations per student run (the curves, CE at equal wall time), the final one included
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
        base_seconds=150.0,
        pretrain_batch=8,
        teacher_lr=3e-3,
        base_lr=3e-3,
        kd_steps=120,
        kd_batch=8,
        kd_lr=1e-3,
        warmup_steps=8,
        evals=8,
        target_seconds=860.0,
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
        base_seconds=20.0,
        pretrain_batch=8,
        teacher_lr=3e-3,
        base_lr=3e-3,
        kd_steps=40,
        kd_batch=8,
        kd_lr=1e-3,
        warmup_steps=4,
        evals=8,
        target_seconds=240.0,
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

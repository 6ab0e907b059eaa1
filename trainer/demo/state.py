"""What every stage of a demo run shares: the run's settings and stage clock, and the corpus it wrote."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from selkd.trainer.demo.settings import Budget
from selkd.trainer.demo.util import fmt_s, say


class Stages:
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


@dataclass
class Run:
    """One demo run's settings, and what every stage adds to the report."""

    budget: Budget  # replaced by the machine-fitted plan once the base student has trained (plan_kd_steps)
    budget_scale: float
    out: Path
    threads: int
    rerun: bool
    t_start: float
    stages: Stages
    nominal_kd_steps: int
    warnings: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)  # the CLI equivalent of each stage

    @property
    def logs(self) -> Path:
        return self.out / "logs"


@dataclass
class Corpus:
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

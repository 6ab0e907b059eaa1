"""What a run reports: ``selkd-train:`` lines on stderr, ``metrics.jsonl`` (and the same scalars to the
``--report-to`` backends, :mod:`selkd.trainer.report`), and the logging window's sums.

Resuming and ``metrics.jsonl``
------------------------------
A resumed run restores the logging window of the checkpoint (so a row that spans the checkpoint holds
the same sums), and ``metrics.jsonl`` is **truncated to the resumed step**: rows with ``step`` greater
than the checkpoint's step (written after the checkpoint by the interrupted run, and redone now) are
dropped, as is a line torn by a kill; a fresh start (no checkpoint) drops every row. So the file always
holds each step's row once, in order, as if the run had never stopped (only the timing fields of the
first row after a resume are approximate: its window's time restarts with the process).

Distributed runs log global values: the losses are the mean over ranks, counts and tokens the sum
(``peak_memory_mb`` is rank 0's).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from selkd.trainer import distributed as D
from selkd.trainer.report import Reporter, open_reporters, scalars

__all__ = ["METRICS_FILE", "WINDOW_KEYS", "MetricsLog", "StepStats", "Window", "log", "truncate_metrics"]

METRICS_FILE = "metrics.jsonl"
# Sums a logging window accumulates (per rank; all-reduced when a row is written).
WINDOW_KEYS = ("loss", "kd", "ce", "selected", "valid", "tokens")


def log(msg: str, main: bool = True) -> None:
    """One ``selkd-train: ...`` line on stderr (only where ``main``)."""
    if main:
        print(f"selkd-train: {msg}", file=sys.stderr, flush=True)


class StepStats(NamedTuple):
    """One optimizer step's statistics on this rank, on the device (the step reads none of them)."""

    sums: torch.Tensor  # [len(WINDOW_KEYS)] float64: loss, kd, ce (means over the micro-batches), the counts (sums)
    grad_norm: torch.Tensor  # scalar: the gradient norm before clipping


class Window:
    """The sums of one logging window on this rank. They stay on the device until a row is written: a
    step adds its :class:`StepStats` without a host sync, and :meth:`read` takes them all (and the last
    gradient norm) to the host in one read per logging step."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.sums = torch.zeros(len(WINDOW_KEYS), dtype=torch.float64, device=device)
        self.steps = 0.0
        self.grad_norm: torch.Tensor | None = None  # the last step's
        self.started = time.time()

    def add(self, stats: StepStats) -> None:
        self.sums += stats.sums
        self.steps += 1
        self.grad_norm = stats.grad_norm

    def reset(self) -> None:
        """Start the next window (now)."""
        self.sums.zero_()
        self.steps = 0.0
        self.started = time.time()

    def read(self) -> dict[str, float]:
        """{WINDOW_KEYS: sum over ranks, "grad_norm": the last step's}: a collective under a process group,
        and the window's one host read."""
        assert self.grad_norm is not None, "read() before any step"
        norm = self.grad_norm.detach().reshape(1).to(torch.float64)
        values = torch.cat([D.all_reduce_sum(self.sums), norm]).tolist()
        return dict(zip((*WINDOW_KEYS, "grad_norm"), values))

    def state_dict(self) -> dict[str, float]:
        """The checkpoint's form: {WINDOW_KEYS and "steps": float}."""
        return {**dict(zip(WINDOW_KEYS, self.sums.tolist())), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        values = [float(state[k]) for k in WINDOW_KEYS]
        self.sums = torch.tensor(values, dtype=torch.float64, device=self.sums.device)
        self.steps = float(state["steps"])


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the rows of ``metrics.jsonl`` whose ``step`` is at most ``step`` (the resumed step; 0 for a
    fresh start) and drop the rest, including unparsable lines (a row torn by a kill). The file is
    rewritten atomically. Returns the number of lines dropped."""
    if not path.is_file():
        return 0
    kept: list[str] = []
    dropped = 0
    for line in path.read_text().splitlines():
        try:
            keep = int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, path)
    return dropped


class MetricsLog:
    """``OUT/metrics.jsonl`` (truncated to the resumed step when opened) and the ``--report-to`` backends
    (:mod:`selkd.trainer.report`), which get each row's scalars; written on rank 0 only (``main``), a no-op
    elsewhere. ``config``: the run's options, for the backends that record them."""

    def __init__(self, out: Path, step: int, report_to: Sequence[str], main: bool, config: dict[str, Any]) -> None:
        self.file: Any = None
        self.reporters: list[Reporter] = []
        if not main:
            return
        path = out / METRICS_FILE
        dropped = truncate_metrics(path, step)
        if dropped:
            log(f"{path}: dropped {dropped} row(s) after step {step} (those steps are redone)")
        self.file = path.open("a")
        self.reporters = open_reporters(report_to, out, step, config)

    def write(self, row: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.reporters:
            step, values = scalars(row)
            for reporter in self.reporters:
                reporter.log(values, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        for reporter in self.reporters:
            reporter.close()

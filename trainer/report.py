"""``--report-to``: the scalars of every ``metrics.jsonl`` row, sent to TensorBoard, W&B or Trackio through
those libraries themselves (rank 0 only; :class:`selkd.trainer.metrics.MetricsLog` calls them).

One class per backend behind one tiny interface (:class:`Reporter`: ``log(scalars, step)`` and ``close()``),
looked up by name in :data:`REPORTERS`. Each library is imported when its reporter opens, so a run without
``--report-to`` never imports it; whether it is installed is checked when the options are parsed
(:func:`check_report_to`), so a missing one is one line naming the pip command before any model loads.

What is logged
--------------
Each row's numbers (not ``step`` and not the ``eval`` marker) under ``train/KEY`` for a training row and
``eval/KEY`` (``eval_`` removed) for an evaluation row, at the row's ``step``: :func:`scalars` is the one
mapping, so every backend holds exactly what ``metrics.jsonl`` holds.

Where it goes, and what a resume does
-------------------------------------
* ``tensorboard``: event files in ``OUT/tensorboard``. A resumed run opens its writer with
  ``purge_step`` = resumed step + 1, so TensorBoard hides the events the interrupted run wrote after its
  checkpoint, exactly as ``metrics.jsonl`` drops those rows.
* ``wandb``: the run's files in ``OUT/wandb`` (``WANDB_MODE=offline`` needs no network: ``wandb sync``
  uploads them later); project ``$WANDB_PROJECT`` or ``selkd``, run name OUT's name. The run id is kept in
  ``OUT/report-run-id``, so a resumed run continues the same W&B run (``resume="allow"``; offline, each
  process writes its own ``offline-run-*-ID`` directory under that one id). W&B does not rewrite history:
  online, the redone steps below the last step the interrupted run logged are ignored by W&B (it warns,
  steps must increase), so they keep the interrupted run's values (the same numbers on CPU; on GPU
  nearly). That online behaviour is W&B's documented one, not tested here (no network).
* ``trackio``: its local SQLite database, project ``selkd`` under ``$TRACKIO_DIR`` (trackio's default:
  ``~/.cache/huggingface/trackio``), run name ``OUTNAME-ID``. A resumed run continues that run
  (``resume="allow"``); Trackio appends, so steps redone after a resume appear twice there.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from selkd.cache.errors import SelkdError

__all__ = [
    "REPORTERS",
    "REPORT_NONE",
    "RUN_ID_FILE",
    "ReportError",
    "Reporter",
    "RunInfo",
    "TensorBoardReporter",
    "TrackioReporter",
    "WandbReporter",
    "check_report_to",
    "open_reporters",
    "parse_report_to",
    "scalars",
]

REPORT_NONE = "none"
RUN_ID_FILE = "report-run-id"
_PIP = "pip install 'selkd[report]'"


class ReportError(SelkdError):
    """A ``--report-to`` backend could not start its run (e.g. W&B online without a login): exit 1."""


class Reporter(Protocol):
    """One logging backend of one run (rank 0)."""

    def log(self, values: dict[str, float], step: int) -> None:
        """Record ``values`` ({name: number}, names from :func:`scalars`) at ``step``."""

    def close(self) -> None:
        """Flush and finish (the files are complete afterwards)."""


def scalars(row: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, {name: value}) of one ``metrics.jsonl`` row: its numbers under ``train/KEY`` or, for an
    evaluation row, ``eval/KEY`` without the ``eval_`` prefix (``step`` and the ``eval`` marker left out)."""
    prefix = "eval/" if row.get("eval") else "train/"
    values = {
        prefix + key.removeprefix("eval_"): float(value)
        for key, value in row.items()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    return int(row["step"]), values


class RunInfo:
    """What every backend names a run by: OUT, the step it starts from (0, or the resumed step), the
    options (``TrainConfig.to_dict()``, credentials redacted) and a run id kept in ``OUT/report-run-id``."""

    def __init__(self, out: Path, step: int, config: Mapping[str, Any]) -> None:
        self.out, self.step, self.config = out, step, dict(config)
        path = out / RUN_ID_FILE
        if not path.is_file():
            path.write_text(uuid.uuid4().hex[:12] + "\n")
        self.run_id = path.read_text().strip()


class TensorBoardReporter:
    """Event files in ``OUT/tensorboard`` (torch's SummaryWriter)."""

    module = "tensorboard"

    def __init__(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = run.step + 1 if run.step > 0 else None  # hide what the interrupted run wrote after its checkpoint
        self.writer = SummaryWriter(str(run.out / "tensorboard"), purge_step=purge)

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """A W&B run with its files in ``OUT/wandb`` (online, or offline with ``WANDB_MODE=offline``)."""

    module = "wandb"

    def __init__(self, run: RunInfo) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "selkd"),
            name=run.out.name,
            id=run.run_id,
            resume="allow",
            dir=str(run.out),
            config=run.config,
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()
        self.wandb.teardown()  # waits for wandb-core to write the run's files (without it they may stay empty)


class TrackioReporter:
    """A Trackio run in its local SQLite database (``$TRACKIO_DIR``); its chatter goes to stderr."""

    module = "trackio"

    def __init__(self, run: RunInfo) -> None:
        import trackio

        self.trackio = trackio
        with contextlib.redirect_stdout(sys.stderr):
            self.run = trackio.init(
                project="selkd",
                name=f"{run.out.name}-{run.run_id}",
                config=run.config,
                resume="allow",
                embed=False,
                auto_log_gpu=False,  # exactly metrics.jsonl's scalars, no system metrics
                auto_log_cpu=False,
            )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        with contextlib.redirect_stdout(sys.stderr):
            self.trackio.finish()  # this run (the current one), and trackio forgets it (no second finish at exit)


REPORTERS: dict[str, Any] = {
    "tensorboard": TensorBoardReporter,
    "wandb": WandbReporter,
    "trackio": TrackioReporter,
}


def parse_report_to(text: str) -> list[str]:
    """``"tensorboard,wandb"`` -> ``["tensorboard", "wandb"]``; ``"none"`` -> ``[]`` (names unchecked)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    return [] if names == [REPORT_NONE] else names


def check_report_to(text: str) -> str | None:
    """``--report-to``'s problem, or None: an unknown name, ``none`` with others, a name twice, or a
    backend whose library is not installed (checked without importing it)."""
    names = parse_report_to(text)
    known = ", ".join([REPORT_NONE, *REPORTERS])
    if not names and text.strip() != REPORT_NONE:
        return f"expected a comma list of {known}, got {text!r}"
    for name in names:
        if name not in REPORTERS:
            return f"{name!r} is not one of: {known}" + (" (none goes alone)" if name == REPORT_NONE else "")
    if len(set(names)) < len(names):
        return f"{text!r} names a backend twice"
    for name in names:
        module = REPORTERS[name].module
        if importlib.util.find_spec(module) is None:
            return f"{name}: {module} is not installed; run {_PIP} (or pip install {module})"
    return None


def open_reporters(names: Sequence[str], out: Path, step: int, config: Mapping[str, Any]) -> list[Reporter]:
    """The reporters ``names`` ask for (from :func:`parse_report_to`), opened for the run in ``out`` that
    starts at ``step``. Rank 0 only."""
    if not names:
        return []
    run = RunInfo(out, step, config)
    opened: list[Reporter] = []
    for name in names:
        try:
            opened.append(REPORTERS[name](run))
        except Exception as err:  # the library's own error, whatever its class: one line, not a traceback
            for reporter in opened:
                reporter.close()
            said = " ".join(str(err).split())[:300] or type(err).__name__  # the library's message, on one line
            problem = f"--report-to {name}: could not start the run: {said}"
            raise ReportError(f"{problem}; fix that or leave {name} out") from err
    return opened

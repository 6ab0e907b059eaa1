"""``--report-to``: every backend holds exactly the scalars of ``metrics.jsonl``, read back with the
library's own reader (TensorBoard's EventAccumulator, Trackio's SQLite storage; W&B offline writes a
LevelDB-style log of protobuf records, read here with wandb's own protobuf classes), and a resumed run
continues the same W&B and Trackio runs.

One real ``selkd-train`` run (online teacher, 2 steps, then extended to 4 by a rerun that resumes at
step 2) in a fresh interpreter, with W&B offline and Trackio's directory under the test's tmp, serves the
three backend tests.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from selkd.trainer.cli import main
from selkd.trainer.metrics import MetricsLog
from selkd.trainer.report import RUN_ID_FILE, RunInfo, TensorBoardReporter, scalars

BACKENDS = "tensorboard,wandb,trackio"


def _train_argv(
    teacher: Path, student: Path, corpus: Path, out: Path, steps: int, report_to: str = BACKENDS
) -> list[str]:
    flags = {
        "teacher": teacher, "data": corpus, "max-seq-len": 64, "limit-tokens": 1500, "eval-fraction": 0.1,
        "student": student, "out": out, "batch-size": 4, "steps": steps, "save-every": 2, "eval-every": 2,
        "eval-batches": 1, "log-every": 1, "num-workers": 0, "progress": "false", "device": "cpu",
        "report-to": report_to,
    }  # fmt: skip
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))]


@pytest.fixture(scope="module")
def reported_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, tiny_student_dir: Path, text_corpus_dir: Path
) -> tuple[Path, Path]:
    """(OUT, TRACKIO_DIR) of a run reported to all three backends: 2 steps, then resumed and extended to 4."""
    root = tmp_path_factory.mktemp("report")
    out, trackio_dir = root / "run", root / "tmp" / "trackio"
    wandb_home = {
        f"WANDB_{name}_DIR": str(root / "tmp" / f"wandb-{name.lower()}") for name in ("CACHE", "CONFIG", "DATA")
    }
    env = {
        **os.environ,
        **wandb_home,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "TRACKIO_DIR": str(trackio_dir),
        "OMP_NUM_THREADS": "1",
    }  # nothing of W&B's or Trackio's lands outside the test's directory
    runs = [_train_argv(tiny_teacher_dir, tiny_student_dir, text_corpus_dir, out, steps) for steps in (2, 4)]
    # both runs in one fresh interpreter (W&B and Trackio keep process-wide state; one start-up is cheaper)
    code = (
        "import json, sys\nfrom selkd.trainer.cli import main\nsys.exit(max(main(a) for a in json.loads(sys.argv[1])))"
    )
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(runs)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr
    return out, trackio_dir


def expected(out: Path) -> list[tuple[int, dict[str, float]]]:
    """metrics.jsonl's rows as (step, {scalar name: value})."""
    return [scalars(json.loads(line)) for line in (out / "metrics.jsonl").read_text().splitlines()]


def by_name(rows: list[tuple[int, dict[str, float]]]) -> dict[str, list[tuple[int, float]]]:
    """{scalar name: [(step, value), ...] in logging order}."""
    series: dict[str, list[tuple[int, float]]] = {}
    for step, values in rows:
        for name, value in values.items():
            series.setdefault(name, []).append((step, value))
    return series


def assert_same_series(got: dict[str, list[tuple[int, float]]], out: Path) -> None:
    want = by_name(expected(out))
    assert {"train/loss", "train/kd", "train/lr", "eval/ce", "eval/top1_agree"} <= set(want)
    assert [step for step, _ in want["train/loss"]] == [1, 2, 3, 4]
    assert got.keys() == want.keys()
    for name, points in want.items():
        assert [s for s, _ in got[name]] == [s for s, _ in points], name
        assert [v for _, v in got[name]] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-9), name


def test_tensorboard_holds_the_metrics_rows(reported_run: tuple[Path, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = reported_run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    got = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert_same_series(got, out)


def test_tensorboard_resume_hides_what_the_interrupted_run_wrote_after_its_checkpoint(tmp_path: Path) -> None:
    """Steps 3-4 written, then a resume at step 2 rewrites them: TensorBoard shows each step once, the
    new values (as metrics.jsonl after truncate_metrics)."""
    first = TensorBoardReporter(RunInfo(tmp_path, 0, {}))
    for step in (1, 2, 3, 4):
        first.log({"train/loss": float(step)}, step)
    first.close()
    resumed = TensorBoardReporter(RunInfo(tmp_path, 2, {}))
    for step in (3, 4):
        resumed.log({"train/loss": 10.0 * step}, step)
    resumed.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def wandb_history(run_file: Path) -> list[dict[str, Any]]:
    """The history rows of one ``run-ID.wandb`` file: a 7-byte header (``:W&B``, magic, version), then
    LevelDB log records in 32 KiB blocks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last), each
    record a serialized ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", run_file
    rows, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return rows


def test_wandb_offline_holds_the_metrics_rows(reported_run: tuple[Path, Path]) -> None:
    out, _ = reported_run
    run_id = (out / RUN_ID_FILE).read_text().strip()
    run_files = sorted((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(run_files) == 2, run_files  # the first run and its resumption: one W&B run id
    got: dict[str, list[tuple[int, float]]] = {}
    for run_file in run_files:
        for row in wandb_history(run_file):
            for name, value in row.items():
                if not name.startswith("_"):  # W&B's own _step, _runtime, _timestamp
                    got.setdefault(name, []).append((int(row["_step"]), value))
    assert_same_series(got, out)


def test_trackio_holds_the_metrics_rows(reported_run: tuple[Path, Path]) -> None:
    out, trackio_dir = reported_run
    assert (trackio_dir / "selkd.db").is_file()
    name = f"{out.name}-{(out / RUN_ID_FILE).read_text().strip()}"
    code = (
        "import json, sys\nfrom trackio.sqlite_storage import SQLiteStorage\n"
        "print(json.dumps(SQLiteStorage.get_logs('selkd', sys.argv[1]), default=str))"
    )
    env = {**os.environ, "TRACKIO_DIR": str(trackio_dir)}  # trackio reads it when imported
    proc = subprocess.run([sys.executable, "-c", code, name], env=env, capture_output=True, text=True, check=True)
    got: dict[str, list[tuple[int, float]]] = {}
    for row in json.loads(proc.stdout.splitlines()[-1]):
        for key, value in row.items():
            if "/" in key:
                got.setdefault(key, []).append((int(row["step"]), value))
    assert_same_series(got, out)


def test_a_missing_library_is_one_line_before_anything_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python marks a module as not importable
    out = tmp_path / "out"
    rc = main(["--cache", str(tmp_path / "no-cache"), "--student", str(tmp_path / "no-model"), "--out", str(out),
               "--report-to", "tensorboard,wandb"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip() == (
        "selkd-train: error: --report-to: wandb: wandb is not installed; run pip install 'selkd[report]' "
        "(or pip install wandb)"
    )
    assert not out.exists()


def test_a_backend_that_cannot_start_is_one_line_and_leaves_nothing(
    tmp_path: Path,
    tiny_teacher_dir: Path,
    tiny_student_dir: Path,
    text_corpus_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """W&B refusing its settings (here an unknown WANDB_MODE) stops the run with W&B's reason on one line
    (exit 1); the run had no checkpoint, so its directory is removed."""
    monkeypatch.setenv("WANDB_MODE", "bogus")
    out = tmp_path / "out"
    rc = main(_train_argv(tiny_teacher_dir, tiny_student_dir, text_corpus_dir, out, 1, "wandb"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1].startswith("selkd-train: error: --report-to wandb: could not start the run: ")
    assert "mode" in err[-1] and err[-1].endswith("; fix that or leave wandb out")
    assert not out.exists()


def test_only_rank_0_reports(tmp_path: Path) -> None:
    """Another rank's MetricsLog opens no backend and writes nothing (rank 0's rows are the global values)."""
    other = MetricsLog(tmp_path, 0, ["tensorboard"], main=False, config={})
    other.write({"step": 1, "loss": 1.0})
    other.close()
    assert other.reporters == [] and list(tmp_path.iterdir()) == []

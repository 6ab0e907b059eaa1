"""kill -9 the builder and the trainer at chosen points, rerun the same command, compare.

The killed run is a child process (``tools/faults.py``: forked from a forkserver that imported selkd
once) that monkeypatches one library function to SIGKILL itself; the rerun is the ordinary command.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import faults  # tools/faults.py (tests/conftest.py puts tools/ on sys.path)
import pytest

from selkd.cache import format as fmt
from selkd.cache import open_cache
from selkd.cache.cli import main as cache_main
from selkd.cache.verify import verify_cache
from selkd.trainer.checkpoint import latest_checkpoint
from selkd.trainer.cli import main as train_main

CACHE_POINTS = [name for name, p in faults.KILL_POINTS.items() if p.kind == "cache"]
TRAIN_POINTS = [name for name, p in faults.KILL_POINTS.items() if p.kind == "train"]


def _log(path: Path) -> str:
    return path.read_text() if path.is_file() else "(no log)"


def test_kill_points_cover_the_required_places() -> None:
    assert {"plan", "scoring", "mid-part", "before-commit", "finalize"} <= set(CACHE_POINTS)
    assert {"between-checkpoints", "checkpoint-weights", "checkpoint-complete"} <= set(TRAIN_POINTS)


@pytest.mark.parametrize("point", CACHE_POINTS)
def test_build_killed_then_rerun_equals_uninterrupted(
    point: str, tmp_path: Path, build_argv: Callable[..., list[str]], reference_cache: Path
) -> None:
    out = tmp_path / "cache"
    log = tmp_path / "child.log"
    code = faults.run_child("cache", build_argv(out), point=point, log=log, timeout_s=300)
    assert code == faults.KILLED, f"exit {code}; child log:\n{_log(log)}"

    # What the kill left: committed parts are intact, and nothing uncommitted is visible to a reader.
    if (out / "zarr.json").exists():
        partial = open_cache(str(out), require_complete=False)
        assert not verify_cache(partial)
        committed = {p.name for p in partial.parts}
        on_disk = {p.name for p in (out / fmt.PARTS_GROUP).iterdir()} if (out / fmt.PARTS_GROUP).is_dir() else set()
        if point in ("mid-write", "before-commit"):
            assert on_disk - committed, "the killed part's arrays should be on disk, uncommitted"
        assert partial.summary is None  # not finalized
        if point == "finalize":  # every part committed: complete and readable, only the summary is missing
            assert not partial.missing_parts
        else:
            with pytest.raises(Exception, match="incomplete cache"):
                open_cache(str(out))

    assert cache_main(build_argv(out)) == 0, "the rerun failed"
    assert cache_main(["verify", str(out)]) == 0
    assert faults.cache_digest(out) == faults.cache_digest(reference_cache)
    assert open_cache(str(out)).summary is not None


@pytest.fixture(scope="module")
def train_argv(reference_cache: Path, tiny_student_dir: Path) -> Callable[[Path], list[str]]:
    def argv(out: Path) -> list[str]:
        return [
            "--cache",
            str(reference_cache),
            "--student",
            str(tiny_student_dir),
            "--out",
            str(out),
            "--steps",
            "12",
            "--batch-size",
            "2",
            "--save-every",
            "4",
            "--log-every",
            "1",
            "--eval-every",
            "0",
            "--num-workers",
            "0",
            "--device",
            "cpu",
            "--progress",
            "false",
        ]

    return argv


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory: pytest.TempPathFactory, train_argv: Callable[[Path], list[str]]) -> list:
    out = tmp_path_factory.mktemp("train_reference")
    assert train_main(train_argv(out)) == 0
    losses = faults.train_losses(out)
    assert [r["step"] for r in losses] == list(range(1, 13))
    return losses


@pytest.mark.parametrize("point", TRAIN_POINTS)
def test_trainer_killed_then_resumed_gives_the_same_losses(
    point: str,
    tmp_path: Path,
    train_argv: Callable[[Path], list[str]],
    reference_losses: list,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    log = tmp_path / "child.log"
    code = faults.run_child("train", train_argv(out), point=point, log=log, timeout_s=300)
    assert code == faults.KILLED, f"exit {code}; child log:\n{_log(log)}"
    # The kill hit the second checkpoint (step 8): the newest complete one is step 4; a half-written
    # step-000008 (tmp directory, even one with COMPLETE inside) is never a candidate.
    latest = latest_checkpoint(out)
    assert latest is not None and latest.name == "step-000004"
    half = [p.name for p in (out / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert bool(half) == (point != "between-checkpoints")

    capsys.readouterr()
    assert train_main(train_argv(out)) == 0
    err = capsys.readouterr().err
    assert "resumed from" in err and "step-000004" in err
    assert "tmp-" not in err.split("resumed from", 1)[1].split("\n", 1)[0]
    assert faults.train_losses(out) == reference_losses

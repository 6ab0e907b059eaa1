"""One error base and one exit-code mapping for every CLI; the trainer never imports the builder."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from selkd.cache.errors import BuildError, Command, ConfigError, DataError, SelkdError, error_exit
from selkd.cache.options import ConfigError as OptionsConfigError
from selkd.cache.reader import CacheCorruptError, CacheError
from selkd.cache.store import StoreError
from selkd.cache.teacher import ModelError
from selkd.trainer.checkpoint import CheckpointError
from selkd.trainer.loop import TrainError
from selkd.trainer.run_dir import OutError

CMD = Command("selkd-x", interrupted="interrupted; rerun to resume", disk_full_rerun="it resumes", out="/data/out")


def test_trainer_never_imports_the_builder_or_the_cache_cli() -> None:
    """Every module of selkd.trainer (the demo, which runs builds on purpose, imports the builder only
    when it runs one) imports neither selkd.cache.build nor selkd.cache.cli."""
    script = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        import selkd.trainer
        packages = pkgutil.walk_packages(selkd.trainer.__path__, "selkd.trainer.")
        names = [m.name for m in packages if not m.name.endswith("__main__")]  # those run a command
        assert "selkd.trainer.cli" in names and "selkd.trainer.demo.run" in names, names
        for name in names:
            importlib.import_module(name)
        print(sorted(m for m in ("selkd.cache.build", "selkd.cache.cli") if m in sys.modules))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (ConfigError, 2),
        (DataError, 1),
        (ModelError, 1),
        (StoreError, 1),
        (CacheError, 1),
        (BuildError, 1),
        (TrainError, 1),
        (CheckpointError, 1),
        (OutError, 1),
    ],
)
def test_every_user_error_is_a_selkd_error_with_its_exit_code(cls: type[SelkdError], code: int) -> None:
    assert issubclass(cls, SelkdError)
    assert error_exit(cls("--thing: what to do"), CMD) == ("selkd-x: error: --thing: what to do", code)


def test_error_classes_keep_their_other_bases() -> None:
    """Code that catches ValueError (a bad option) or RuntimeError (a checkpoint) still does."""
    assert OptionsConfigError is ConfigError and issubclass(ConfigError, ValueError)
    assert issubclass(CheckpointError, RuntimeError)
    assert issubclass(CacheCorruptError, CacheError)
    err = CacheCorruptError("/c", "part-00000", "input_ids", "sha256 differs")
    assert error_exit(err, CMD) == (f"selkd-x: error: {err}", 1)


def test_full_disk_ctrl_c_and_bugs() -> None:
    # a full disk in any clothes: one line naming where the command writes, exit 1
    full = OSError(errno.ENOSPC, "No space left on device", "/data/out/parts/x")
    try:
        raise RuntimeError("torch.save failed") from full
    except RuntimeError as wrapped:
        line, code = error_exit(wrapped, CMD)  # type: ignore[misc]
    assert code == 1
    assert line == (
        "selkd-x: error: /data/out: no space left on the device while writing /data/out/parts/x; free space (or "
        "raise the quota) there and rerun the same command: it resumes"
    )
    # a SelkdError raised for a full disk already names the place: it stands
    try:
        raise CheckpointError("/data/out/checkpoints/step-000002: no space left") from full
    except CheckpointError as err:
        assert error_exit(err, CMD) == ("selkd-x: error: /data/out/checkpoints/step-000002: no space left", 1)
    assert error_exit(KeyboardInterrupt(), CMD) == ("selkd-x: interrupted; rerun to resume", 130)
    assert error_exit(ValueError("a bug"), CMD) is None  # propagates with its traceback
    noted = Command("selkd-demo", "i", "r", note=" (stage logs: out/logs)")
    assert error_exit(DataError("too small"), noted) == ("selkd-demo: error: too small (stage logs: out/logs)", 1)


def _interrupt(*_args: object, **_kwargs: object) -> None:
    raise KeyboardInterrupt


def _bug(*_args: object, **_kwargs: object) -> None:
    raise ZeroDivisionError("a bug")


@pytest.mark.parametrize(
    ("module", "target", "argv", "hint"),
    [
        (
            "selkd.cache.cli",
            "selkd.cache.build.build_cache",
            ["build", "--teacher", "T", "--data", "D", "--out", "O"],
            "selkd-cache: interrupted; rerun the same command to resume (committed parts are kept)",
        ),
        (
            "selkd.trainer.cli",
            "selkd.trainer.loop.train",
            ["--cache", "C", "--student", "S", "--out", "O"],
            "selkd-train: interrupted; rerun the same command to resume from the last checkpoint",
        ),
        (
            "selkd.trainer.demo.cli",
            "selkd.trainer.demo.run.run_demo",
            ["--out", "O"],
            "selkd-demo: interrupted; rerun the same command to continue (finished stages are reused)",
        ),
    ],
    ids=["selkd-cache", "selkd-train", "selkd-demo"],
)
def test_each_cli_maps_ctrl_c_to_130_and_lets_bugs_through(
    module: str,
    target: str,
    argv: list[str],
    hint: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    import importlib

    cli = importlib.import_module(module)
    monkeypatch.chdir(tmp_path)
    # the CLIs import what runs the command once its options are parsed: patch it where it lives
    monkeypatch.setattr(target, _interrupt)
    assert cli.main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines() == [hint]
    monkeypatch.setattr(target, _bug)
    with pytest.raises(ZeroDivisionError):
        cli.main(argv)

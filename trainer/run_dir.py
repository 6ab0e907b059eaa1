"""The run directory (``--out``): which directories a run may write to, what marks one as a selkd run,
what a failed run leaves behind and what a finished one keeps.

* ``--out`` is a new or empty directory, or a selkd-train run: it holds :data:`RUN_FILE` (written when
  a run starts), or, written by a selkd from before that file, complete checkpoints and a selkd
  ``config.json``. Anything else is refused: a model directory's own ``config.json`` would be
  overwritten and the model would no longer load.
* No input is ever written to: ``--out`` may not be, contain or lie inside the ``--student``,
  ``--student-config``, ``--teacher`` or ``--data`` paths or a local ``--cache``.
* A run that fails without leaving a complete checkpoint removes what it created (the directories it
  made; in a directory that existed, the entries that were not there before) and nothing else. A run
  with a complete checkpoint keeps everything: rerunning the command resumes from it.
* A finished run says so in :data:`RUN_FILE`, so that a rerun knows the run is complete even after
  ``--keep-checkpoints 0`` removed every checkpoint.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selkd.cache.errors import SelkdError
from selkd.cache.info import human_bytes
from selkd.cache.sources import DATASETS_PREFIX
from selkd.cache.store import is_url
from selkd.trainer import checkpoint as ckpt

__all__ = ["RUN_FILE", "OutError", "RunDir", "claim", "describe_kept", "input_paths"]

RUN_FILE = "selkd-run.json"
CONFIG_FILE = "config.json"  # the run's options, TrainConfig.to_dict()
# Keys only a selkd-train config.json holds (a model's config.json has none of them).
_RUN_CONFIG_KEYS = frozenset({"select", "select_policy", "kd_weight"})


class OutError(SelkdError):
    """``--out`` cannot be used for this run: names the directory and what to do."""


def input_paths(cfg: Any) -> list[tuple[str, Path]]:
    """(flag, resolved path) of every input of ``cfg`` (a TrainConfig) that exists on this machine: hub
    ids and URLs have none. A ``--data`` glob stands for its matches, and a recursive (``**``) glob for
    its fixed leading directory too, whose new files it would read on a rerun."""
    models = (("--student", cfg.student), ("--student-config", cfg.student_config), ("--teacher", cfg.teacher))
    named: list[tuple[str, str]] = [(flag, value) for flag, value in models if value]
    if cfg.cache and not is_url(cfg.cache):
        named.append(("--cache", cfg.cache.removeprefix("file://")))
    if cfg.tokens and not is_url(cfg.tokens):
        named.append(("--tokens", cfg.tokens.removeprefix("file://")))
    for spec in cfg.data:
        spec = spec.removeprefix(DATASETS_PREFIX).split("?")[0]  # datasets:DIR?split=...: the directory
        path = Path(spec).expanduser()
        if path.exists() or glob.escape(spec) == spec:
            named.append(("--data", spec))
            continue
        named += [("--data", match) for match in glob.glob(str(path), recursive=True)]
        if "**" in spec:
            fixed = list(itertools.takewhile(lambda part: glob.escape(part) == part, path.parts))
            named.append(("--data", str(Path(*fixed)) if fixed else "."))
    found = [(flag, Path(value).expanduser()) for flag, value in named]
    return [(flag, path.resolve()) for flag, path in found if path.exists()]


def _check_not_an_input(out: Path, cfg: Any) -> None:
    """``out``: resolved."""
    for flag, path in input_paths(cfg):
        if out == path:
            where = f"is the {flag} path"
        elif path in out.parents:
            where = f"is inside the {flag} path {path}"
        elif out in path.parents:
            where = f"contains the {flag} path {path}"
        else:
            continue
        raise OutError(
            f"--out {cfg.out}: {where}; selkd-train never writes into its inputs: choose a new or empty "
            "directory outside them for --out"
        )


def _is_run(out: Path) -> bool:
    """Whether ``out`` is a selkd-train run (see the module docstring)."""
    if (out / RUN_FILE).is_file():
        return True
    try:
        config = json.loads((out / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.keys() >= _RUN_CONFIG_KEYS and bool(ckpt.list_checkpoints(out))


def _check_usable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OutError(f"--out {out}: is a file, not a directory; choose a new or empty directory for --out")
    if not out.is_dir() or _is_run(out):
        return
    entries = sorted(p.name for p in out.iterdir())
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise OutError(
            f"--out {out}: holds files that are not a selkd-train run ({shown}); choose a new or empty "
            f"directory for --out (a run writes {CONFIG_FILE}, checkpoints/ and final/ there)"
        )


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


@dataclass
class RunDir:
    """The ``--out`` directory of this run, as :func:`claim` found and marked it (rank 0 only)."""

    path: Path
    created: Path | None  # the topmost directory this run created; None: ``path`` existed
    before: frozenset[str]  # the names in ``path`` when the run started

    def record(self) -> dict[str, Any]:
        """:data:`RUN_FILE`'s content (empty if it is unreadable)."""
        try:
            record = json.loads((self.path / RUN_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def saved_config(self) -> dict[str, Any] | None:
        """The options the run was started with (its ``config.json``), if readable."""
        try:
            config = json.loads((self.path / CONFIG_FILE).read_text())
        except (OSError, ValueError):
            return None
        return config if isinstance(config, dict) else None

    def mark_finished(self, step: int, total: int) -> None:
        """Record that the run trained all its ``total`` steps and wrote ``final/``."""
        _write_json(self.path / RUN_FILE, {**self.record(), "finished": {"step": step, "total_steps": total}})

    def discard_unless_resumable(self) -> None:
        """After a failure: remove what this run created, unless a complete checkpoint makes it resumable."""
        if ckpt.list_checkpoints(self.path):
            return
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
            return
        for entry in self.path.iterdir():
            if entry.name in self.before:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def claim(cfg: Any) -> RunDir:
    """Check ``cfg.out`` (see the module docstring; raises :class:`OutError`), create it and mark it as a
    selkd-train run. Call on rank 0 only, before anything is written there."""
    out = Path(os.path.abspath(Path(cfg.out).expanduser()))
    _check_not_an_input(out.resolve(), cfg)
    try:
        _check_usable(out)
        created = next((p for p in [*reversed(out.parents), out] if not p.exists()), None)
        before = frozenset(p.name for p in out.iterdir()) if created is None else frozenset()
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file on the way, no permission, a read-only file system, ...
        raise OutError(f"--out {out}: cannot be used ({err.strerror}); choose another --out") from err
    run = RunDir(out, created, before)
    try:
        if not (out / RUN_FILE).is_file():
            _write_json(out / RUN_FILE, {"selkd_run": 1, "finished": None})
    except BaseException:  # e.g. a full disk
        run.discard_unless_resumable()
        raise
    return run


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def describe_kept(final: Path, kept: list[Path]) -> str:
    """What a finished run leaves, for its last log line: the final model and the kept checkpoints."""
    text = f"the student is in {final} ({human_bytes(_size(final))})"
    if not kept:
        return f"{text}; no checkpoint kept (--keep-checkpoints 0), so the run cannot be extended"
    sizes = human_bytes(sum(_size(p) for p in kept))
    names = ", ".join(str(p) for p in kept)
    return (
        f"{text}; kept {len(kept)} checkpoint(s), {sizes} (weights and optimizer state, to resume or extend "
        f"the run; --keep-checkpoints sets how many stay): {names}"
    )

"""Where checkpoints live and how they come and go: ``OUT/checkpoints/step-NNNNNN`` directories, found by
scanning for ``COMPLETE`` (never via a pointer file), removed by renaming them out of the ``step-N``
namespace first (``.trash-<pid>``), and the fsyncs that make a rename durable. The formats inside a
directory are :mod:`selkd.trainer.checkpoint`'s."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

__all__ = [
    "CHECKPOINTS_DIR",
    "COMPLETE",
    "checkpoints_root",
    "clean_incomplete",
    "discard",
    "fsync_dir",
    "fsync_file",
    "latest_checkpoint",
    "list_checkpoints",
    "prune_checkpoints",
    "step_dir_name",
]

CHECKPOINTS_DIR = "checkpoints"
COMPLETE = "COMPLETE"
_STEP_RE = re.compile(r"^step-(\d+)$")


def fsync_file(path: Path) -> None:
    """Flush a written file to the disk (before ``COMPLETE`` names it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the entries of ``path`` (a rename into it, a new file) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # platforms without directory fds (Windows): rename is the best we can do
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def step_dir_name(step: int) -> str:
    """``step-000123``: zero-padded, so names sort like steps."""
    return f"step-{step:06d}"


def discard(path: Path) -> None:
    """Remove a directory safely: rename it out of the ``step-N`` namespace first."""
    if not path.exists():
        return
    trash = path.with_name(f"{path.name}.trash-{os.getpid()}-{time.monotonic_ns()}")
    try:
        path.rename(trash)
        fsync_dir(path.parent)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


def checkpoints_root(out_dir: str | Path) -> Path:
    """``OUT/checkpoints``."""
    return Path(out_dir) / CHECKPOINTS_DIR


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``OUT/checkpoints`` as (step, path), oldest first. Only directories named
    exactly ``step-N`` that hold ``COMPLETE`` count; tmp/trash directories and unfinished ones do not."""
    root = checkpoints_root(out_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_RE.match(child.name)
        if m and child.is_dir() and (child / COMPLETE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None. Found by scanning, never via a pointer
    file; has no side effects (call :func:`clean_incomplete` on rank 0 to tidy up)."""
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def clean_incomplete(out_dir: str | Path) -> list[Path]:
    """Remove half-written checkpoints (``*.tmp-*``, ``*.trash-*``, ``step-N`` without ``COMPLETE``) left by
    a crash. Call on rank 0 only, with no other writer on ``OUT`` (this process's own tmp dir is kept).
    Returns what was removed."""
    root = checkpoints_root(out_dir)
    if not root.is_dir():
        return []
    own = f".tmp-{os.getpid()}"
    removed = []
    for child in sorted(root.iterdir()):
        if not child.is_dir():
            continue
        half = ".tmp-" in child.name and not child.name.endswith(own)
        trash = ".trash-" in child.name
        unfinished = bool(_STEP_RE.match(child.name)) and not (child / COMPLETE).is_file()
        if trash:
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
        elif half or unfinished:
            discard(child)
            removed.append(child)
    return removed


def prune_checkpoints(out_dir: str | Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` (>= 0) complete checkpoints; returns the ones that stay."""
    found = [path for _, path in list_checkpoints(out_dir)]
    cut = max(0, len(found) - keep)
    for path in found[:cut]:
        discard(path)
    return found[cut:]

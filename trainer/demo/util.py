"""Small helpers of the demo: printing, digests, JSON files, formatting, logs, command lines."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shlex
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from selkd.cache.options import flag_name, negated_flag


def say(msg: str = "") -> None:
    print(msg, flush=True)


def digest(obj: Any, n: int = 12) -> str:
    """A short, stable hash of a JSON-able object: the identity of a stage's inputs."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, obj: Any) -> None:
    """Write atomically, so an interrupted run never leaves a stamp that claims a finished stage."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def fmt_s(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@contextlib.contextmanager
def logged(path: Path) -> Iterator[None]:
    """Send a stage's own output (the trainer's and builder's log lines) to a file, keeping the
    demo's console to one line per event; the file is named if the stage fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def as_cli(prog: str, cfg: Any, defaults: Any, always: Sequence[str] = ()) -> str:
    """The command line that runs ``cfg`` (options that differ from ``defaults``, and ``always``), so
    users can repeat a stage by hand: shell-quoted, booleans as ``--x`` / ``--no-x``, mappings as one
    ``--x KEY=VALUE`` per key."""
    parts = [prog]
    for f in dataclasses.fields(cfg):
        if not f.metadata or not f.metadata.get("cli", True):
            continue
        value, default = getattr(cfg, f.name), getattr(defaults, f.name)
        if (value == default and f.name not in always) or value in (None, [], {}):
            continue
        flag = flag_name(f.name)
        if isinstance(value, bool):
            parts.append(flag if value else negated_flag(f.name))
        elif isinstance(value, dict):
            parts += [
                f"{flag} {shlex.quote(f'{k}={v if isinstance(v, str) else json.dumps(v)}')}" for k, v in value.items()
            ]
        elif isinstance(value, list):
            parts.append(f"{flag} " + " ".join(shlex.quote(str(v)) for v in value))
        else:
            parts.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(parts)

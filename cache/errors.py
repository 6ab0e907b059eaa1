"""The errors a user can cause, and the one mapping of exceptions to a message and an exit code.

Every user-facing error class of selkd derives from :class:`SelkdError` (ConfigError, DataError and BuildError
here; ModelError, StoreError, CacheError and the trainer's errors where they are raised), so a
command line catches one class and exits with that class's code: 2 for bad usage or configuration,
1 for a problem at run time. :func:`error_exit` is the mapping every CLI (``selkd-cache``,
``selkd-train``, ``selkd-demo``) uses through :func:`run_cli`; anything it does not know is a bug and
keeps its traceback.

A full disk is the one run-time failure that is not a SelkdError where it happens: writers report
ENOSPC (no space left) and EDQUOT (over quota) in different clothes. Python's own file I/O raises
``OSError`` with the errno; ``torch.save`` raises ``RuntimeError`` whose context is that ``OSError``;
libraries written in Rust (safetensors) raise their own exception type whose message ends in Rust's
``(os error 28)``. :func:`disk_full_error` sees through all three, so every CLI turns a full disk into
the same kind of one-line message instead of a traceback.

Pure Python, imported by every CLI before it parses anything: no numpy, torch or zarr here.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "DISK_FULL",
    "BuildError",
    "Command",
    "ConfigError",
    "DataError",
    "SelkdError",
    "disk_full_error",
    "disk_full_message",
    "error_exit",
    "one_line",
    "run_cli",
]

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's std::io::Error displays an errno


class SelkdError(Exception):
    """A problem the user can act on: the message is one line naming the thing (file, option, part,
    array) and what to do. ``exit_code`` is what a command exits with: 1 (a run-time problem) unless a
    subclass says otherwise."""

    exit_code: int = 1


class ConfigError(SelkdError, ValueError):
    """A user-facing configuration error: the message names the option and what to do (exit 2)."""

    exit_code = 2


class BuildError(SelkdError):
    """A user-facing build failure: names the thing and what to do."""


class DataError(SelkdError):
    """A user-facing data problem; the message is one line naming the path and what to do."""


def one_line(err: BaseException | str) -> str:
    """Collapse an exception text to one line so DataError messages stay one line."""
    return " ".join(str(err).split())


def disk_full_error(err: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT behind ``err`` (itself, or its cause or context, followed to the end) as an
    ``OSError``, if any. An error that only names the errno in a Rust-style message becomes a new
    ``OSError`` of that errno (without a file name)."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return e
        match = _RUST_OS_ERROR.search(str(e))
        if match and int(match.group(1)) in DISK_FULL:
            code = int(match.group(1))
            return OSError(code, os.strerror(code))
        e = e.__cause__ or e.__context__
    return None


def disk_full_message(where: str, err: OSError, rerun: str) -> str:
    """One line: which place, what happened (and to which file), what to do; ``rerun`` says what
    rerunning the same command does with what was already written there."""
    what = "over the disk quota" if err.errno == errno.EDQUOT else "no space left on the device"
    file = f" while writing {err.filename}" if err.filename else ""
    return f"{where}: {what}{file}; free space (or raise the quota) there and rerun the same command: {rerun}"


@dataclass
class Command:
    """What the error mapping needs to know about the running command.

    ``interrupted``: the line after ``prog:`` on Ctrl-C (what rerunning resumes); ``disk_full_rerun``:
    what rerunning does after a full disk; ``out``: where the command writes, named in a full disk's
    message (set once the options are parsed); ``note``: appended to every error line (``selkd-demo``
    names its stage logs)."""

    prog: str
    interrupted: str
    disk_full_rerun: str
    out: str | None = None
    note: str = ""


def error_exit(err: BaseException, cmd: Command) -> tuple[str, int] | None:
    """The one line to print (``prog: error: ...``) and the exit code for ``err``, or None when it is
    not a problem the user caused (a bug: let it propagate with its traceback).

    A SelkdError comes first: one raised for a full disk (a checkpoint's) already names the place."""
    if isinstance(err, KeyboardInterrupt):
        return f"{cmd.prog}: {cmd.interrupted}", 130
    if isinstance(err, SelkdError):
        return f"{cmd.prog}: error: {err}{cmd.note}", err.exit_code
    full = disk_full_error(err)
    if full is not None:
        where = cmd.out if cmd.out is not None else "the output"
        return f"{cmd.prog}: error: {disk_full_message(where, full, cmd.disk_full_rerun)}{cmd.note}", 1
    return None


def run_cli(cmd: Command, fn: Callable[[], int]) -> int:
    """``fn()``'s exit code, or the code :func:`error_exit` gives for what it raised, after printing
    the one line on stderr. Exceptions it does not map (bugs) and SystemExit (argparse) propagate."""
    try:
        return fn()
    except (Exception, KeyboardInterrupt) as err:
        mapped = error_exit(err, cmd)
        if mapped is None:
            raise
        line, code = mapped
        print(line, file=sys.stderr)
        return code

"""A full disk, recognised wherever it surfaces: one line naming the place and what to do.

Writers report ENOSPC (no space left) and EDQUOT (over quota) in different clothes: Python's own file
I/O raises ``OSError`` with the errno; ``torch.save`` raises ``RuntimeError`` whose context is that
``OSError``; libraries written in Rust (safetensors) raise their own exception type whose message ends
in Rust's ``(os error 28)``. :func:`disk_full_error` sees through all three, so every CLI (the cache's,
the trainer's) turns a full disk into the same kind of one-line message instead of a traceback.
"""

from __future__ import annotations

import errno
import os
import re

__all__ = ["DISK_FULL", "disk_full_error", "disk_full_message"]

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's std::io::Error displays an errno


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

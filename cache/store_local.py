"""The local-directory backend (zarr's ``LocalStore``; also NFS).

Coordination is "atomic" here: ``create_exclusive`` is ``link(2)`` of a fully written temporary
file, which fails if the key exists (what zarr's own exclusive put does), and compare-and-swap
(leases) runs under ``flock`` on ``selkd/leases/.lock`` plus the process-wide thread lock. Exact
between threads and processes of one host; on NFS as good as the server's ``link`` and lock manager
(NFSv4 maps ``flock`` to byte-range locks).
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

from zarr.storage import LocalStore

from selkd.cache.format import LEASES_PREFIX
from selkd.cache.store import LeaseSafety, Storage, StoreError, process_lock

try:  # POSIX only: without it local leases are exact between threads of one process only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

# Temporary files of writes in progress, zarr's and ours: ``<name>.<32 hex>.partial``.
_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")
_LOCK_KEY = f"{LEASES_PREFIX}/.lock"


def _local_path(location: str) -> Path:
    return Path(location[len("file://") :] if location.startswith("file://") else location).expanduser()


class LocalStorage(Storage):
    """A cache in a local directory."""

    store: LocalStore

    @classmethod
    def open_path(cls, location: str, mode: str) -> LocalStorage:
        """Mode "r": the directory must exist. Mode "w": it is created if missing."""
        path = _local_path(location)
        if mode == "r":
            if not path.exists():
                raise StoreError(f"{path}: no such cache directory")
            if not path.is_dir():
                raise StoreError(f"{path}: is a file, not a cache directory")
        else:
            if path.exists() and not path.is_dir():
                raise StoreError(f"{path}: exists and is a file; choose a directory for --out")
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise StoreError(f"{path}: cannot create the cache directory ({err.strerror})") from err
        return cls(LocalStore(str(path), read_only=(mode == "r")), str(path))

    @property
    def local_path(self) -> Path:
        return Path(self.store.root)

    @property
    def lease_safety(self) -> LeaseSafety:
        return "atomic"

    def _hidden(self, key: str) -> bool:
        """Temporary files of writes in progress and the lease lock file are not objects. Hiding them
        keeps listings the same as on object stores, where they do not exist (a listing taken during
        a write would otherwise show ``p-0001.<uuid>.partial`` as if it were a record)."""
        return _PARTIAL.search(key) is not None or key == _LOCK_KEY

    def _create_if_absent(self, key: str, data: bytes) -> bool:
        """Write a temporary file completely, then ``link(2)`` it to the key: link fails if the key
        exists, so creation is atomic and the object is complete from the moment it appears."""
        path = self.local_path / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                # NFS: a retried LINK whose first reply was lost fails with EEXIST although it worked;
                # the temporary file then has two links.
                return os.stat(tmp).st_nlink == 2
            except OSError as err:
                raise StoreError(
                    f"{path}: cannot create it exclusively; the filesystem does not support hard links "
                    f"({err.strerror}), which atomic creation needs"
                ) from err
            return True
        finally:
            tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def serialised(self) -> Iterator[None]:
        """The process-wide thread lock, plus ``flock`` so that other processes (which also take it)
        wait too. The lock file is never deleted: a lock on a deleted file would not exclude a
        process that opens a new one."""
        with process_lock():
            lock_path = self.local_path / _LOCK_KEY
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

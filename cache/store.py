"""The storage interface: one :class:`Storage` per backend, opened by :meth:`Storage.open`.

Everything the cache reads or writes goes through a :class:`Storage`, which wraps one zarr ``Store``
so that arrays (through zarr) and small JSON records (through the same store) share one
connection, one set of options and one behaviour. The backends, one module each:

- ``store_local.py``: a local (or NFS) directory, zarr's ``LocalStore``;
- ``store_fsspec.py``: any fsspec URL (``memory://``, ``gs://``, ``hf://``, ``https://``) through
  zarr's ``FsspecStore``, and the translation of failed requests into one-line errors;
- ``store_s3.py``: ``s3://`` (AWS S3, Ceph RGW, moto), an fsspec backend with conditional writes;
- ``store_memory.py``: zarr's ``MemoryStore`` in this process (tests).

What the base class does once for every backend, through zarr's public ``Store`` API: bytes and
JSON, existence, deletes, listings (directory semantics for prefixes), sizes, zarr arrays, the
read-only check. What a backend supplies: how to open it, an atomic create-if-absent, how far its
coordination can be trusted (:attr:`Storage.lease_safety`), and optionally a versioned read and
compare-and-swap better than the default (a content hash under a lock) and keys to hide from
listings. Leases, built on those primitives, live in ``leases.py``.

Atomicity of single objects (``write_bytes``): readers see the old object or the new one, never a
part of it, on every backend: LocalStore (zarr 3.1.x) writes ``<key>.<uuid>.partial`` in the same
directory and renames it over the key (no fsync: atomic against crashes of the writer and
concurrent readers, not durable against power loss); an object store's PUT (or a multipart upload,
which appears only when completed) replaces the whole object.

Coordination between workers (``create_exclusive``, leases) needs an atomic "create if absent" and
"replace if unchanged". What each backend gives (:attr:`Storage.lease_safety`): "atomic" (local
disk: ``link(2)`` and ``flock``; S3 with conditional writes: the server decides), "in-process"
(stores only this process can see: exact), "best-effort" (any other fsspec filesystem, or an S3
endpoint that ignores conditional headers: read-compare-write under a process-local lock, so two
hosts racing within one round trip can both believe they won). The details are in each backend's
module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import zarr
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from selkd.cache.errors import SelkdError

LeaseSafety = Literal["atomic", "in-process", "best-effort"]

# Serialises this process's read-compare-write sequences where the backend has no conditional write
# (lease updates on local disk and in-process stores, exclusive creates on stores without a native
# one). Re-entrant so that a lease update may call create_exclusive while holding it.
_PROCESS_LOCK = threading.RLock()


def _reset_process_lock() -> None:
    """A child forked while another thread held the lock would otherwise wait for it forever."""
    global _PROCESS_LOCK
    _PROCESS_LOCK = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_process_lock)


@contextlib.contextmanager
def process_lock() -> Iterator[None]:
    """The process-wide lock of read-compare-write sequences (re-entrant; reset in forked children)."""
    with _PROCESS_LOCK:
        yield


class StoreError(SelkdError):
    """A user-facing storage problem: names the store and what to do."""


def is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def digest(data: bytes) -> str:
    """The version token of an object on backends without native versions: its content's sha256."""
    return hashlib.sha256(data).hexdigest()


def json_bytes(obj: Any) -> bytes:
    """How every JSON record is stored: indented, keys sorted."""
    return json.dumps(obj, indent=1, sort_keys=True).encode()


class Storage(ABC):
    """Keys are '/'-separated paths relative to the cache root; ``store`` is the zarr store wrapped."""

    def __init__(self, store: Store, url: str) -> None:
        self.store = store
        self.url = url
        # Lease expiry is wall-clock time (epoch seconds) so that hosts can judge each other's leases;
        # replaceable for tests.
        self.clock: Callable[[], float] = time.time

    # --- opening: the factory that picks the backend ---------------------------------------------
    @classmethod
    def open(
        cls, location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None, mode: str = "r"
    ) -> Storage:
        """``mode`` is "r" (must exist) or "w" (created if missing). A local path opens a
        :class:`~selkd.cache.store_local.LocalStorage`; a URL an fsspec backend
        (:meth:`~selkd.cache.store_fsspec.FsspecStorage.open_url`: ``s3://`` gets
        :class:`~selkd.cache.store_s3.S3Storage`), which makes its first requests here so that bad
        credentials, a denied policy or an unreachable server fail now, as one :class:`StoreError`."""
        # The backends import this module (the interface), so they are imported when first opened.
        from selkd.cache.store_fsspec import FsspecStorage
        from selkd.cache.store_local import LocalStorage

        location = str(location)
        if mode not in ("r", "w"):
            raise ValueError(f"mode must be 'r' or 'w', not {mode!r}")
        if location.startswith("memory-store://"):
            raise StoreError("use Storage.memory() for an in-process store")
        if is_url(location):
            return FsspecStorage.open_url(location, storage_options, mode)
        if storage_options:
            raise StoreError(f"{location}: --storage-option only applies to URLs such as s3://bucket/prefix")
        return LocalStorage.open_path(location, mode)

    @classmethod
    def memory(cls) -> Storage:
        """A new, empty, writable store in this process (tests)."""
        from selkd.cache.store_memory import MemoryStorage

        return MemoryStorage()

    # --- what differs per backend ------------------------------------------------------------------
    @abstractmethod
    def _create_if_absent(self, key: str, data: bytes) -> bool:
        """Create ``key`` with ``data`` unless it exists; True if this call created it (see
        :meth:`create_exclusive`)."""

    @property
    @abstractmethod
    def lease_safety(self) -> LeaseSafety:
        """How far ``create_exclusive`` and leases can be trusted here: "atomic" (exact between
        processes), "in-process" (the store lives in this process, and is exact for it) or
        "best-effort" (a race window of one round trip between processes)."""

    @property
    def local_path(self) -> Path | None:
        """The directory behind a local store; None for every other backend."""
        return None

    def _hidden(self, key: str) -> bool:
        """Whether ``key`` is a backend artefact rather than an object (hidden from listings)."""
        return False

    @contextlib.contextmanager
    def serialised(self) -> Iterator[None]:
        """Mutual exclusion for read-compare-write where the backend has no conditional write: the
        process-wide lock (local disk adds a lock between processes)."""
        with process_lock():
            yield

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """The object and a token that changes whenever it is rewritten (by default its content's
        sha256; S3: the ETag, read in the same request as the body), or None if absent."""
        data = self.read_bytes(key)
        return None if data is None else (data, digest(data))

    def swap(self, key: str, token: str | None, data: bytes | None) -> bool:
        """Replace the object whose token is ``token`` (None: the object must be absent) with
        ``data`` (None: delete it). True if this call did so; False if someone changed it first.
        By default a read-compare-write inside :meth:`serialised`."""
        with self.serialised():
            current = self.read_bytes(key)
            if (current is None) != (token is None) or (current is not None and digest(current) != token):
                return False
            if data is None:
                self.delete(key)
            elif token is None:
                return self.create_exclusive(key, data)
            else:
                self.write_bytes(key, data)
            return True

    # --- bytes and JSON ------------------------------------------------------------------------------
    def read_bytes(self, key: str) -> bytes | None:
        buf = sync(self.store.get(key, prototype=default_buffer_prototype()))
        return None if buf is None else buf.to_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        """Atomic: readers see the old object or the new one, never a part of it (see module doc)."""
        sync(self.store.set(key, default_buffer_prototype().buffer.from_bytes(data)))

    def read_json(self, key: str) -> Any | None:
        data = self.read_bytes(key)
        if data is None:
            return None
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StoreError(f"{self.url}/{key}: not valid JSON ({err}); the record is corrupt") from err

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, json_bytes(obj))

    def exists(self, key: str) -> bool:
        return bool(sync(self.store.exists(key)))

    def delete(self, key: str) -> None:
        sync(self.store.delete(key))

    def delete_prefix(self, prefix: str) -> None:
        sync(self.store.delete_dir(prefix.rstrip("/")))

    # --- listings and sizes --------------------------------------------------------------------------
    @staticmethod
    def _dir_prefix(prefix: str) -> str:
        """``"a"`` and ``"a/"`` both mean the directory ``a/``: zarr's MemoryStore matches plain string
        prefixes (``"a"`` would also match ``"ab/..."``) while LocalStore and FsspecStore match
        directories; normalising gives every backend the directory meaning."""
        prefix = prefix.strip("/")
        return f"{prefix}/" if prefix else ""

    def list_dir(self, prefix: str) -> list[str]:
        """Immediate children (names) below ``prefix``, sorted."""
        prefix = self._dir_prefix(prefix)

        async def collect() -> list[str]:
            return [k async for k in self.store.list_dir(prefix)]

        return sorted({k.rstrip("/") for k in sync(collect()) if not self._hidden(prefix + k.rstrip("/"))})

    def list_prefix(self, prefix: str) -> list[str]:
        """Every key below the directory ``prefix`` (recursive; "" for all), sorted."""
        prefix = self._dir_prefix(prefix)

        async def collect() -> list[str]:
            return [k async for k in self.store.list_prefix(prefix)]

        return sorted(k for k in sync(collect()) if not self._hidden(k))

    def size_bytes(self, prefix: str = "") -> int:
        """Total stored bytes of every object below the directory ``prefix``."""
        prefix = self._dir_prefix(prefix)
        return int(sync(self.store.getsize_prefix(prefix))) if self.list_prefix(prefix) else 0

    def is_empty(self) -> bool:
        return not self.list_prefix("")

    # --- exclusive create ------------------------------------------------------------------------------
    def check_writable(self, what: str) -> None:
        if self.store.read_only:
            raise StoreError(f"{self.url}: opened read-only; {what} needs mode 'w'")

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create ``key`` with ``data`` only if it does not exist; True if this call created it.

        Atomic where :attr:`lease_safety` is "atomic" or "in-process": of any number of concurrent
        callers exactly one gets True, and readers never see a partial object. Elsewhere it is a
        check-then-write with a race window of one round trip. A lost response on S3 that the
        client retries can report False for an object this call did create: callers that must know
        put a unique token in ``data`` and read it back (leases do).
        """
        self.check_writable("create_exclusive")
        return self._create_if_absent(key, data)

    def create_json(self, key: str, obj: Any) -> bool:
        """:meth:`create_exclusive` of ``obj`` as JSON: True if this call created ``key``."""
        return self.create_exclusive(key, json_bytes(obj))

    def _create_checked(self, key: str, data: bytes) -> bool:
        """Create-if-absent as check-then-write under the process lock: exact within this process."""
        with process_lock():
            if self.exists(key):
                return False
            self.write_bytes(key, data)
            return True

    # --- zarr --------------------------------------------------------------------------------------------
    def open_array(self, path: str) -> zarr.Array:
        return zarr.open_array(self.store, path=path, mode="r")

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

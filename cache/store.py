"""A narrow interface in front of storage: local paths, fsspec URLs (s3://, memory://).

Everything the cache reads or writes goes through :class:`Storage`, which wraps one zarr ``Store``
so that arrays (through zarr) and small JSON records (through the same store) share one
connection, one set of options and one behaviour. Writes of single objects are atomic on every
backend we support: LocalStore writes a temporary file and renames it; an object store's PUT
replaces the whole object.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import zarr
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, MemoryStore


class StoreError(Exception):
    """A user-facing storage problem: names the store and what to do."""


def is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def _local_path(location: str) -> Path:
    return Path(location[len("file://") :] if location.startswith("file://") else location).expanduser()


class Storage:
    """Keys are '/'-separated paths relative to the cache root."""

    def __init__(self, store: Store, url: str) -> None:
        self.store = store
        self.url = url

    # --- opening -------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        location: str | os.PathLike[str],
        storage_options: Mapping[str, Any] | None = None,
        mode: str = "r",
    ) -> Storage:
        """``mode`` is "r" (must exist) or "w" (created if missing)."""
        location = str(location)
        if isinstance(location, str) and location.startswith("memory-store://"):
            raise StoreError("use Storage.memory() for an in-process store")
        if is_url(location):
            try:
                store = FsspecStore.from_url(
                    location, storage_options=dict(storage_options or {}), read_only=(mode == "r")
                )
            except ImportError as err:
                raise StoreError(
                    f"{location}: the filesystem for this URL is not installed ({err}); "
                    "for s3:// run `pip install selkd[s3]`"
                ) from err
            except Exception as err:
                raise StoreError(f"{location}: cannot open ({type(err).__name__}: {err})") from err
            storage = cls(store, location)
            if mode == "r" and not storage.exists("zarr.json"):
                raise StoreError(
                    f"{location}: no cache there (no zarr.json); check the URL and storage options"
                )
            return storage
        if storage_options:
            raise StoreError(f"{location}: --storage-option only applies to URLs such as s3://bucket/prefix")
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

    @classmethod
    def memory(cls) -> Storage:
        return cls(MemoryStore(), "memory")

    @property
    def local_path(self) -> Path | None:
        return Path(self.store.root) if isinstance(self.store, LocalStore) else None

    # --- bytes and JSON ------------------------------------------------------------------------
    def read_bytes(self, key: str) -> bytes | None:
        buf = sync(self.store.get(key, prototype=default_buffer_prototype()))
        return None if buf is None else buf.to_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        """Atomic: readers see the old object or the new one, never a part of it."""
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
        self.write_bytes(key, json.dumps(obj, indent=1, sort_keys=True).encode())

    def exists(self, key: str) -> bool:
        return bool(sync(self.store.exists(key)))

    def delete(self, key: str) -> None:
        sync(self.store.delete(key))

    def delete_prefix(self, prefix: str) -> None:
        prefix = prefix.rstrip("/")
        sync(self.store.delete_dir(prefix))

    def list_dir(self, prefix: str) -> list[str]:
        """Immediate children (names) below ``prefix``, sorted."""

        async def collect() -> list[str]:
            return [k async for k in self.store.list_dir(prefix.rstrip("/") + "/" if prefix else "")]

        return sorted({k.rstrip("/") for k in sync(collect())})

    def list_prefix(self, prefix: str) -> list[str]:
        """Every key below ``prefix`` (recursive), sorted."""

        async def collect() -> list[str]:
            return [k async for k in self.store.list_prefix(prefix)]

        return sorted(sync(collect()))

    def size_bytes(self, prefix: str = "") -> int:
        """Total stored bytes of every object under ``prefix``."""
        return int(sync(self.store.getsize_prefix(prefix))) if self.list_prefix(prefix) else 0

    def is_empty(self) -> bool:
        return not self.list_prefix("")

    # --- zarr ----------------------------------------------------------------------------------
    def open_array(self, path: str) -> zarr.Array:
        return zarr.open_array(self.store, path=path, mode="r")

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

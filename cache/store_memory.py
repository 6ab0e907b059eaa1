"""The in-process backend: zarr's ``MemoryStore`` (tests, and anything that needs a scratch store).

Only this process can see the store, so coordination is exact ("in-process"): create-if-absent is a
check-then-write under the process-wide lock.
"""

from __future__ import annotations

from zarr.storage import MemoryStore

from selkd.cache.store import LeaseSafety, Storage


class MemoryStorage(Storage):
    """A new, empty, writable store held in this process."""

    def __init__(self) -> None:
        super().__init__(MemoryStore(), "memory")

    @property
    def lease_safety(self) -> LeaseSafety:
        return "in-process"

    def _create_if_absent(self, key: str, data: bytes) -> bool:
        return self._create_checked(key, data)

"""Leases per part: one builder writes a part at a time.

Builders that would write the same part (two launched with the same rank, or a rerun started while
the first run still goes) are kept apart by a lease per part in the store (``selkd/leases/``, the
primitive is :meth:`selkd.cache.store.Storage.acquire_lease`). A builder writes a part only while it
holds the part's lease (:class:`PartLeases`), renews it between batches and right before the commit
record (:class:`LeasedPartWriter`), and skips a part another live builder holds, coming back to it
at the end (:func:`run_leased`: the other builder commits it, or its lease lapses, or its holder is
found dead on this host, and this builder takes the part over). A holder that lost its lease never
writes the commit record.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from selkd.cache import format as fmt
from selkd.cache.store import Storage
from selkd.cache.writer import PartWriter


def log(msg: str) -> None:
    """One builder message on stderr (the build's own lines use it too)."""
    print(f"selkd-cache: {msg}", file=sys.stderr, flush=True)


class LeaseLost(Exception):
    """This builder no longer holds a part's lease (it lapsed and another builder took the part over)."""

    def __init__(self, part: str) -> None:
        super().__init__(f"{part}: lost the lease on this part to another builder")
        self.part = part


def _pid_space() -> str:
    """A short id of this kernel boot and pid namespace: process ids of two lease holders can be
    compared only when both are equal (containers on one host can share a hostname, e.g. with host
    networking, while their pids live in separate namespaces)."""
    parts = []
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        return ""
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def lease_owner() -> str:
    """A lease owner unique to this builder: ``host:pid:pidspace:uuid``."""
    return f"{socket.gethostname()}:{os.getpid()}:{_pid_space()}:{uuid.uuid4().hex}"


def _pid_alive(pid: int) -> bool:
    """False only when ``pid`` certainly does not run here (no such process, or a zombie)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    try:  # exited but not yet reaped by its parent
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def holder_is_dead(owner: str) -> bool:
    """True if the lease ``owner`` names a process of this host (same pid namespace) that has exited.
    Owners on other hosts, or in other containers, cannot be judged: their lease must lapse."""
    fields = owner.split(":")
    if len(fields) != 4 or not fields[1].isdigit():
        return False
    host, pid, space, _ = fields
    here = _pid_space()
    if host != socket.gethostname() or not space or space != here:
        return False
    return not _pid_alive(int(pid))


class PartLeases:
    """This builder's leases on parts and score parts (``selkd/leases/parts/part-00001.json``, ...).

    ``acquire`` takes a part's lease (or takes over the lease of a holder that died on this host);
    ``renew`` extends it (``due_only``: only once a fifth of the TTL has passed, so that renewing
    between batches costs little) and raises :class:`LeaseLost` when another builder took it over;
    ``release`` gives it up after the commit (or a failure), so that nobody waits for it to lapse.
    """

    def __init__(self, storage: Storage, ttl_s: float, owner: str | None = None) -> None:
        self.storage = storage
        self.ttl_s = float(ttl_s)
        self.owner = owner or lease_owner()
        self._renewed: dict[str, float] = {}

    @staticmethod
    def lease_name(part: str) -> str:
        group = fmt.SCORES_GROUP if part.startswith("score-") else fmt.PARTS_GROUP
        return f"{group}/{part}"

    def acquire(self, part: str) -> bool:
        name = self.lease_name(part)
        if self.storage.acquire_lease(name, self.owner, self.ttl_s):
            self._renewed[part] = time.monotonic()
            return True
        holder = self.storage.read_lease(name)
        if holder is not None and holder_is_dead(str(holder.get("owner", ""))):
            pid = str(holder["owner"]).split(":")[1]
            log(f"{part}: the builder holding it (pid {pid} on this host) has exited; taking the part over")
            # A compare-and-swap on the dead owner's record: of several builders doing this, one wins.
            self.storage.release_lease(name, holder["owner"])
            if self.storage.acquire_lease(name, self.owner, self.ttl_s):
                self._renewed[part] = time.monotonic()
                return True
        return False

    def renew(self, part: str, due_only: bool = False) -> None:
        if due_only and time.monotonic() - self._renewed.get(part, 0.0) < self.ttl_s / 5:
            return
        if not self.storage.renew_lease(self.lease_name(part), self.owner, self.ttl_s):
            raise LeaseLost(part)
        self._renewed[part] = time.monotonic()

    def release(self, part: str) -> None:
        """Give the lease up; a failure to do so is logged, not raised (the lease then lapses)."""
        self._renewed.pop(part, None)
        try:
            self.storage.release_lease(self.lease_name(part), self.owner)
        except Exception as err:
            log(f"{part}: could not release its lease ({type(err).__name__}: {err}); it lapses in {self.ttl_s:.0f} s")

    def holder(self, part: str) -> str:
        """Who holds ``part`` and for how long, for messages."""
        record = self.storage.read_lease(self.lease_name(part))
        if record is None:
            return "nobody"
        left = float(record.get("expires", 0)) - self.storage.clock()
        state = f"expires in {left:.0f} s" if left > 0 else "lapsed"
        return f"{record.get('owner')}, lease {state}"


def _commit_key(part: str) -> str:
    prefix = fmt.SCORE_COMMITS_PREFIX if part.startswith("score-") else fmt.COMMITS_PREFIX
    return f"{prefix}/{part}.json"


def run_leased(
    storage: Storage,
    leases: PartLeases,
    parts: Sequence[str],
    work: Callable[[str], None],
    poll_s: float | None = None,
) -> int:
    """Call ``work(part)`` for every part of ``parts`` that is not committed, each under its lease.

    A part another live builder holds is skipped and retried after the others; once only such parts
    are left, this polls until each is committed by its holder or its lease lapses (then this builder
    takes it over). ``work`` raising :class:`LeaseLost` puts the part back the same way; any other
    exception releases the lease and propagates. Returns the number of parts this call wrote.
    """
    poll = poll_s if poll_s is not None else min(2.0, leases.ttl_s / 10)
    pending = list(parts)
    written = 0
    announced: set[str] = set()
    while pending:
        deferred = []
        for part in pending:
            if storage.exists(_commit_key(part)):
                continue
            if not leases.acquire(part):
                deferred.append(part)
                if part not in announced:
                    announced.add(part)
                    log(f"{part}: held by another builder ({leases.holder(part)}); coming back to it later")
                continue
            try:
                if storage.exists(_commit_key(part)):  # committed by the holder we just followed
                    continue
                work(part)
                written += 1
            except LeaseLost as err:
                log(f"{err}; not committing it, coming back to it later")
                deferred.append(part)
            finally:
                leases.release(part)
        if deferred and deferred != pending:  # once per change, not at every poll
            log(
                f"waiting for {len(deferred)} part(s) held by other builders ({', '.join(deferred[:5])}"
                f"{' ...' if len(deferred) > 5 else ''}): they commit them, or their leases lapse and this builder "
                "takes them over"
            )
        pending = deferred
        if pending:
            time.sleep(poll)
    return written


class _CommitGuard(Storage):
    """The store as a :class:`PartWriter` sees it: the part's commit record is written only while this
    builder still holds the part's lease, renewed right before the write."""

    def __init__(self, base: Storage, commit_key: str, check: Callable[[], None]) -> None:
        super().__init__(base.store, base.url)
        self.clock = base.clock
        self._commit_key, self._check = commit_key, check

    def write_json(self, key: str, obj: Any) -> None:
        if key == self._commit_key:
            self._check()
        super().write_json(key, obj)


class LeasedPartWriter(PartWriter):
    """A :class:`PartWriter` whose commit renews the part's lease before writing the arrays and again
    right before the commit record; :class:`LeaseLost` aborts the commit."""

    def __init__(self, storage: Storage, leases: PartLeases, name: str, *args: Any) -> None:
        guarded = _CommitGuard(storage, _commit_key(name), lambda: leases.renew(name))
        super().__init__(guarded, name, *args)
        self.leases = leases

    def commit(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        self.leases.renew(self.name)
        return super().commit(extra)

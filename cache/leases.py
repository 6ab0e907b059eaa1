"""Every lease: the lease records in a store and the per-part leases of builders.

Lease records (:func:`acquire_lease` / :func:`renew_lease` / :func:`release_lease` /
:func:`read_lease`) are JSON objects at ``selkd/leases/<name>.json``: owner, host, pid, acquired,
renewed, expires (epoch seconds, by the storage's ``clock``) and a token unique to each write. Every
change is a compare-and-swap against the version just read (:meth:`Storage.read_versioned` and
:meth:`Storage.swap`: the ETag on S3, a content hash under a lock elsewhere), never
delete-then-create: with that, a slow racer's delete could remove the winner's fresh lease. Where
the backend's :attr:`~selkd.cache.store.Storage.lease_safety` is not "best-effort", of any number of
racers for a free or expired lease exactly one wins, and a holder's renew/release never touches a
lease someone else took over. What a lease cannot promise on any backend: a holder that stalls past
``expires`` (pause, partition) may still be working after another took over; so guarded work must
be idempotent or check :func:`renew_lease` before committing, and host clocks must agree to well
within the TTL.

Per part, one builder writes a part at a time. Builders that would write the same part (two
launched with the same rank, or a rerun started while the first run still goes) are kept apart by
a lease per part. A builder writes a part only while it holds the part's lease
(:class:`PartLeases`), renews it between batches and right before the commit record
(:class:`LeasedPartWriter`), and skips a part another live builder holds, coming back to it at the
end (:func:`run_leased`: the other builder commits it, or its lease lapses, or its holder is found
dead on this host, and this builder takes the part over). A holder that lost its lease never
writes the commit record.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from selkd.cache import format as fmt
from selkd.cache.store import Storage, json_bytes
from selkd.cache.writer import PartWriter

_LEASE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
_MAX_LEASE_ATTEMPTS = 8


def log(msg: str) -> None:
    """One builder message on stderr (the build's own lines use it too)."""
    print(f"selkd-cache: {msg}", file=sys.stderr, flush=True)


# --- lease records -----------------------------------------------------------------------------------
def lease_key(name: str) -> str:
    """Where lease ``name`` lives: ``selkd/leases/<name>.json``."""
    if not isinstance(name, str) or not _LEASE_NAME.fullmatch(name):
        raise ValueError(
            f"lease name {name!r}: use letters, digits, '.', '_', '-' and '/' "
            "(not starting with '.' or '-', no empty components)"
        )
    return f"{fmt.LEASES_PREFIX}/{name}.json"


def _parse_lease(data: bytes | None) -> dict[str, Any] | None:
    """A lease record, or None for an absent, released (tombstone) or unreadable one. Leases are
    written atomically, so unreadable means damaged by hand: treating it as free beats a lease
    that can never be taken."""
    if not data:
        return None
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or not record.get("owner"):
        return None
    return record


def read_lease(storage: Storage, name: str) -> dict[str, Any] | None:
    """The current record of lease ``name`` (owner, host, pid, expires, acquired, renewed, token),
    expired or not; None if nobody holds or held it."""
    return _parse_lease(storage.read_bytes(lease_key(name)))


def _check_lease_args(owner: str, ttl_s: float | None) -> None:
    if not isinstance(owner, str) or not owner:
        raise ValueError("lease owner must be a non-empty string")
    if ttl_s is not None and not (isinstance(ttl_s, (int, float)) and math.isfinite(ttl_s) and ttl_s > 0):
        raise ValueError(f"lease ttl_s must be a positive number of seconds, not {ttl_s!r}")


def _lease_record(owner: str, ttl_s: float, now: float, previous: dict[str, Any] | None) -> dict[str, Any]:
    acquired = now
    if previous is not None and previous.get("owner") == owner:
        acquired = float(previous.get("acquired", now))
    return {
        "owner": owner,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "acquired": acquired,
        "renewed": now,
        "expires": now + float(ttl_s),
        # Unique per write: tells "my write landed" from "someone else's" after an ambiguous
        # failure (a retried conditional request that had in fact succeeded).
        "token": uuid.uuid4().hex,
    }


def _write_lease(storage: Storage, key: str, token: str | None, record: dict[str, Any]) -> bool:
    if storage.swap(key, token, json_bytes(record)):
        return True
    current = _parse_lease(storage.read_bytes(key))
    return current is not None and current.get("token") == record["token"]


def _held(storage: Storage, key: str) -> tuple[tuple[bytes, str] | None, dict[str, Any] | None]:
    """The lease object with its version token, and its record (None if free or released)."""
    current = storage.read_versioned(key)
    return current, _parse_lease(current[0] if current else None)


def acquire_lease(storage: Storage, name: str, owner: str, ttl_s: float) -> bool:
    """Take lease ``name`` for ``owner`` for ``ttl_s`` seconds; True if ``owner`` now holds it.

    Succeeds if the lease is free, released, expired (its holder died or stopped renewing), or
    already held by ``owner`` (then it is extended). Fails (False) while another owner's lease
    has not expired. Of several callers racing for a free or expired lease, exactly one wins
    where ``storage.lease_safety`` is not "best-effort". ``owner`` identifies the holder: make it
    unique per worker (:func:`lease_owner`); two workers sharing one owner string share the lease.
    Expiry compares wall clocks: hosts must agree to well within ``ttl_s``.
    """
    key = lease_key(name)
    _check_lease_args(owner, ttl_s)
    storage.check_writable("acquire_lease")
    for _ in range(_MAX_LEASE_ATTEMPTS):
        now = storage.clock()
        current, held = _held(storage, key)
        if held is not None and held["owner"] != owner and float(held.get("expires", 0)) > now:
            return False
        record = _lease_record(owner, ttl_s, now, held)
        if _write_lease(storage, key, current[1] if current else None, record):
            return True
        # Someone changed the lease between our read and write: look again.
    return False


def renew_lease(storage: Storage, name: str, owner: str, ttl_s: float) -> bool:
    """Extend ``owner``'s lease to ``ttl_s`` seconds from now. False means ``owner`` no longer holds
    it (released, or expired and taken over): stop the guarded work. A lease that expired but
    that nobody took over is still ``owner``'s and is renewed."""
    _check_lease_args(owner, ttl_s)
    storage.check_writable("renew_lease")
    return _update_own(
        storage,
        name,
        owner,
        lambda key, token, held: _write_lease(storage, key, token, _lease_record(owner, ttl_s, storage.clock(), held)),
    )


def release_lease(storage: Storage, name: str, owner: str) -> bool:
    """Give up ``owner``'s lease so that others can take it at once. True if this call removed
    it; False if ``owner`` did not hold it (never did, or it was taken over). Never removes
    another owner's lease, even one written between our read and our delete."""
    _check_lease_args(owner, None)
    storage.check_writable("release_lease")
    return _update_own(storage, name, owner, lambda key, token, held: storage.swap(key, token, None))


def _update_own(
    storage: Storage, name: str, owner: str, update: Callable[[str, str | None, dict[str, Any]], bool]
) -> bool:
    """Apply ``update(key, token, held)`` (a compare-and-swap against ``token``) to ``owner``'s lease,
    retrying when another writer got in between; False once ``owner`` does not hold it."""
    key = lease_key(name)
    for _ in range(_MAX_LEASE_ATTEMPTS):
        current, held = _held(storage, key)
        if current is None or held is None or held["owner"] != owner:
            return False
        if update(key, current[1], held):
            return True
    return False


# --- per-part leases of builders -----------------------------------------------------------------------
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
        if acquire_lease(self.storage, name, self.owner, self.ttl_s):
            self._renewed[part] = time.monotonic()
            return True
        holder = read_lease(self.storage, name)
        if holder is not None and holder_is_dead(str(holder.get("owner", ""))):
            pid = str(holder["owner"]).split(":")[1]
            log(f"{part}: the builder holding it (pid {pid} on this host) has exited; taking the part over")
            # A compare-and-swap on the dead owner's record: of several builders doing this, one wins.
            release_lease(self.storage, name, holder["owner"])
            if acquire_lease(self.storage, name, self.owner, self.ttl_s):
                self._renewed[part] = time.monotonic()
                return True
        return False

    def renew(self, part: str, due_only: bool = False) -> None:
        if due_only and time.monotonic() - self._renewed.get(part, 0.0) < self.ttl_s / 5:
            return
        if not renew_lease(self.storage, self.lease_name(part), self.owner, self.ttl_s):
            raise LeaseLost(part)
        self._renewed[part] = time.monotonic()

    def release(self, part: str) -> None:
        """Give the lease up; a failure to do so is logged, not raised (the lease then lapses)."""
        self._renewed.pop(part, None)
        try:
            release_lease(self.storage, self.lease_name(part), self.owner)
        except Exception as err:
            log(f"{part}: could not release its lease ({type(err).__name__}: {err}); it lapses in {self.ttl_s:.0f} s")

    def holder(self, part: str) -> str:
        """Who holds ``part`` and for how long, for messages."""
        record = read_lease(self.storage, self.lease_name(part))
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


class _CommitGuard:
    """The store as a :class:`PartWriter` sees it: ``base`` in every respect (by delegation), except
    that the part's commit record is written only while this builder still holds the part's lease,
    renewed right before the write."""

    def __init__(self, base: Storage, commit_key: str, check: Callable[[], None]) -> None:
        self._base, self._commit_key, self._check = base, commit_key, check

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)

    def write_json(self, key: str, obj: Any) -> None:
        if key == self._commit_key:
            self._check()
        self._base.write_json(key, obj)


class LeasedPartWriter(PartWriter):
    """A :class:`PartWriter` whose commit renews the part's lease before writing the arrays and again
    right before the commit record; :class:`LeaseLost` aborts the commit."""

    def __init__(self, storage: Storage, leases: PartLeases, name: str, *args: Any) -> None:
        guarded = _CommitGuard(storage, _commit_key(name), lambda: leases.renew(name))
        super().__init__(guarded, name, *args)  # type: ignore[arg-type]
        self.leases = leases

    def commit(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        self.leases.renew(self.name)
        return super().commit(extra)

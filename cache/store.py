"""A narrow interface in front of storage: local paths, fsspec URLs (s3://, memory://).

Everything the cache reads or writes goes through :class:`Storage`, which wraps one zarr ``Store``
so that arrays (through zarr) and small JSON records (through the same store) share one
connection, one set of options and one behaviour.

Atomicity of single objects (``write_bytes``): readers see the old object or the new one, never a
part of it, on every backend we support. LocalStore (zarr 3.1.x) writes ``<key>.<uuid>.partial`` in
the same directory and renames it over the key; it does not fsync, so this is atomic against
crashes of the writer and concurrent readers, not durable against power loss. An object store's
PUT (or a multipart upload, which appears only when completed) replaces the whole object.

Coordination between workers (``create_exclusive`` and leases) needs an atomic "create if absent"
and "replace if unchanged". What each backend gives (see :attr:`Storage.lease_safety`):

- local directory ("atomic"): ``link(2)`` of a fully written temporary file, which fails if the
  key exists (what zarr's own exclusive put does), and lease updates serialised by ``flock`` on
  ``selkd/leases/.lock`` plus a per-process thread lock. Exact between threads and processes of
  one host; on NFS as good as the server's ``link`` and lock manager (NFSv4 maps ``flock`` to
  byte-range locks).
- S3 with conditional writes ("atomic"; AWS S3, Ceph RGW, moto 5.2.5): ``PUT If-None-Match: *``
  to create, ``PUT If-Match: <etag>`` to replace, ``DELETE If-Match: <etag>`` to remove; the server
  decides, so exact between any number of hosts. Support is probed once per :class:`Storage`
  (servers that do not know the headers ignore them); without conditional DELETE a released lease
  is overwritten (If-Match) by an empty tombstone instead of deleted.
- in-process stores (``Storage.memory()``, ``memory://``; "in-process"): exact, since only this
  process can see them (a process-wide lock, or ``dict.setdefault``).
- any other fsspec filesystem, or an S3 endpoint that ignores conditional headers ("best-effort"):
  read-compare-write under a process-local lock; two hosts racing within one round trip can both
  believe they won (the later write wins on the server). A warning is logged (S3).

Leases (``acquire_lease`` / ``renew_lease`` / ``release_lease``) are JSON records at
``selkd/leases/<name>.json``: owner, host, pid, acquired, renewed, expires (epoch seconds) and a
token unique to each write. Every change is a compare-and-swap against the version just read
(ETag on S3, content hash under the lock elsewhere), never delete-then-create: with that, a slow
racer's delete could remove the winner's fresh lease. Where the backend is "atomic", of any
number of racers for a free or expired lease exactly one wins, and a holder's renew/release
never touches a lease someone else took over. What a lease cannot promise on any backend: a
holder that stalls past ``expires`` (pause, partition) may still be working after another took
over; so guarded work must be idempotent or check ``renew_lease`` before committing, and host
clocks must agree to well within the TTL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import zarr
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, MemoryStore

from selkd.cache.errors import SelkdError
from selkd.cache.format import LEASES_PREFIX

try:  # POSIX only: without it local leases are exact between threads of one process only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

# Leases live at ``selkd/leases/<name>.json`` (format.LEASES_PREFIX).

LeaseSafety = Literal["atomic", "in-process", "best-effort"]
_T = TypeVar("_T")

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

_LEASE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
# S3 error codes meaning "your condition did not hold" (412) or "a concurrent conditional write is
# in flight, you lost" (409): both mean another writer got there first.
_S3_LOST_RACE = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
# S3 error codes meaning "these credentials are not valid here" (unknown key, wrong secret, expired
# session), as opposed to AccessDenied: "valid, but a policy does not allow this request".
_S3_BAD_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
}
# Exception class names (botocore, aiohttp, httpx, requests, urllib3) that mean "could not connect":
# no network, a name that does not resolve, a refused connection, a timeout.
_UNREACHABLE = re.compile(r"Connect|Timeout|NameResolution")
_S3_PROTOCOLS = {"s3", "s3a"}
_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")
_MAX_LEASE_ATTEMPTS = 8


class StoreError(SelkdError):
    """A user-facing storage problem: names the store and what to do."""


def is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def _local_path(location: str) -> Path:
    return Path(location[len("file://") :] if location.startswith("file://") else location).expanduser()


def _url_protocols(location: str) -> list[str]:
    """Protocols of a (possibly chained, ``simplecache::s3://...``) fsspec URL."""
    return [part.split("://", 1)[0] for part in location.split("::")]


def _check_protocols(location: str) -> None:
    """Reject unknown schemes up front: fsspec's own error ('Protocol not known') does not say what
    we accept."""
    from fsspec.registry import known_implementations, registry

    for protocol in _url_protocols(location):
        if protocol not in registry and protocol not in known_implementations:
            raise StoreError(
                f"{location}: unknown URL scheme {protocol + '://'!r}; use a local directory, "
                "s3://bucket/prefix, or another fsspec URL (memory://, gs://, ...)"
            )


def _s3_storage_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults for s3fs that a shared, multi-writer cache needs.

    - ``use_listings_cache=False``: s3fs otherwise caches directory listings for the life of the
      filesystem object and answers ``exists``/``ls`` from them, so objects written later by other
      workers stay invisible (seen with s3fs 2026.9).
    - ``endpoint_url`` from the standard ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` variables when
      no endpoint option is given (unless ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true``). botocore
      >= 1.31 reads them itself; doing it here also covers older botocore and lets error messages
      name the endpoint.
    """
    opts = dict(options)
    opts.setdefault("use_listings_cache", False)
    client_kwargs = opts.get("client_kwargs") or {}
    ignore_env = os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").strip().lower() == "true"
    if not opts.get("endpoint_url") and not client_kwargs.get("endpoint_url") and not ignore_env:
        env_endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if env_endpoint:
            opts["endpoint_url"] = env_endpoint
    return opts


def _s3_error_code(err: BaseException) -> str | None:
    """The S3 error code (``AccessDenied``, ``412``, ...) of ``err`` as raised by s3fs, which translates
    botocore's ClientError into an OSError raised from it; None if it carries none."""
    for e in (err, err.__cause__):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code"):
            return str(response["Error"]["Code"])
    return None


def _s3_lost_race(err: BaseException) -> bool:
    """True if ``err`` (as raised by s3fs, which wraps botocore's ClientError) is a failed condition."""
    if isinstance(err, FileExistsError):  # s3fs's translation of 412 for If-None-Match
        return True
    return _s3_error_code(err) in _S3_LOST_RACE


def _unreachable(err: BaseException) -> bool:
    """Whether ``err``, or an exception it was raised from, is a failure to connect to the server."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)):
            return True
        if any(_UNREACHABLE.search(t.__name__) for t in type(e).__mro__):
            return True
        e = e.__cause__ or e.__context__
    return False


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Storage:
    """Keys are '/'-separated paths relative to the cache root."""

    def __init__(self, store: Store, url: str) -> None:
        self.store = store
        self.url = url
        # Lease expiry is wall-clock time (epoch seconds) so that hosts can judge each other's leases;
        # replaceable for tests.
        self.clock: Callable[[], float] = time.time
        # S3 conditional-write support, probed on first use: (PUT If-None-Match / If-Match, DELETE If-Match).
        self._s3_conditional: tuple[bool, bool] | None = None

    # --- opening -------------------------------------------------------------------------------
    @classmethod
    def open(
        cls, location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None, mode: str = "r"
    ) -> Storage:
        """``mode`` is "r" (must exist) or "w" (created if missing).

        For s3:// the bucket must exist (checked here, so a typo fails now with a clear message
        rather than at the first write). Credentials, region and endpoint come from
        ``storage_options`` (s3fs arguments: ``key``, ``secret``, ``endpoint_url``, ...) or, failing
        that, from the standard AWS environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
        ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``, profiles). For every URL the first requests are
        made here, so that rejected credentials, a policy that denies reading (or, in mode "w", writing)
        and a server that cannot be reached fail now, each as one :class:`StoreError` saying what to check.
        """
        location = str(location)
        if mode not in ("r", "w"):
            raise ValueError(f"mode must be 'r' or 'w', not {mode!r}")
        if location.startswith("memory-store://"):
            raise StoreError("use Storage.memory() for an in-process store")
        if is_url(location):
            return cls._open_url(location, storage_options, mode)
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
    def _open_url(cls, location: str, storage_options: Mapping[str, Any] | None, mode: str) -> Storage:
        _check_protocols(location)
        options = dict(storage_options or {})
        is_s3 = _url_protocols(location)[-1] in _S3_PROTOCOLS
        if is_s3:
            options = _s3_storage_options(options)
        try:
            store = FsspecStore.from_url(location, storage_options=options, read_only=(mode == "r"))
        except ImportError as err:
            raise StoreError(
                f"{location}: the filesystem for this URL is not installed ({err}); "
                "for s3:// run `pip install selkd[s3]`"
            ) from err
        except Exception as err:
            raise StoreError(f"{location}: cannot open ({type(err).__name__}: {err})") from err
        storage = cls(store, location)
        if is_s3:
            storage._check_bucket()
        # One GET, not a HEAD: a failed GET says why (S3 error codes come in the body; fsspec's http
        # ``exists`` turns an unreachable host into False). Every reader and writer needs this object.
        read_root = (lambda: storage._s3_get("zarr.json")) if is_s3 else (lambda: storage.read_bytes("zarr.json"))
        found = storage._first_request("reading zarr.json", read_root)
        if mode == "r" and found is None:
            raise StoreError(f"{location}: no cache there (no zarr.json); check the URL and storage options")
        if mode == "w" and is_s3:  # a writer's first write is this probe (PUT and DELETE), not a part's array
            storage._first_request("writing a probe object", storage._s3_caps)
        return storage

    def _first_request(self, doing: str, call: Callable[[], _T]) -> _T:
        """``call()``, with a failure turned into one :class:`StoreError` that says what to do."""
        try:
            return call()
        except StoreError:
            raise
        except Exception as err:
            raise self._request_error(err, doing) from err

    def _request_error(self, err: BaseException, doing: str) -> StoreError:
        """What a failed request means for the user: rejected credentials, a request the credentials
        may not make, a server that cannot be reached, or else the error itself."""
        where = f" at {self._endpoint}" if self._endpoint else ""
        code = _s3_error_code(err)
        reason = f"{code or type(err).__name__}: {err}"
        if code in _S3_BAD_CREDENTIALS:
            return StoreError(
                f"{self.url}: the S3 endpoint{where} rejected the credentials ({reason}); check the access key "
                "and secret (storage options key/secret, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) or the "
                "profile (AWS_PROFILE)"
            )
        if code == "AccessDenied" or isinstance(err, PermissionError):
            what = (
                "the bucket policy and the IAM policy of these credentials (s3:GetObject, s3:PutObject, "
                "s3:DeleteObject and s3:ListBucket on the bucket and prefix), or use other credentials "
                "(key/secret, AWS_PROFILE)"
                if self.is_s3
                else "the credentials and permissions in the storage options"
            )
            return StoreError(f"{self.url}: access denied {doing}{where} ({reason}); check {what}")
        if _unreachable(err):
            return StoreError(
                f"{self.url}: cannot reach the server{where} ({reason}); check the URL and the network "
                "(no network, a proxy or firewall in the way, or the server is down)"
            )
        return StoreError(f"{self.url}: failed {doing}{where} ({reason})")

    def _check_bucket(self) -> None:
        """One HEAD on the bucket: a missing bucket otherwise shows up as 'no such key' much later
        (or, in mode "r", as a misleading 'no cache there')."""
        fs = self._fs
        bucket = fs.split_path(self.store.path)[0]  # type: ignore[attr-defined]
        where = f" at {self._endpoint}" if self._endpoint else ""
        try:
            sync(fs._call_s3("head_bucket", Bucket=bucket))
        except FileNotFoundError as err:
            raise StoreError(
                f"{self.url}: bucket {bucket!r} does not exist{where}; create it first or check the URL "
                "and the endpoint (storage option endpoint_url or AWS_ENDPOINT_URL)"
            ) from err
        except PermissionError:
            # HeadBucket needs s3:ListBucket, which a reader limited to one prefix may lack, and a HEAD's
            # 403 has no body to tell wrong credentials from a policy: the GET of zarr.json that follows
            # (in _open_url) decides and says which.
            log.debug("%s: HeadBucket on %r denied; not checking that the bucket exists", self.url, bucket)
        except Exception as err:
            hint = ""
            if "Credentials" in type(err).__name__:
                hint = (
                    "; pass storage options key/secret, or set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
                )
            raise StoreError(
                f"{self.url}: cannot reach bucket {bucket!r}{where} ({type(err).__name__}: {err}){hint}"
            ) from err

    @classmethod
    def memory(cls) -> Storage:
        return cls(MemoryStore(), "memory")

    @property
    def local_path(self) -> Path | None:
        return Path(self.store.root) if isinstance(self.store, LocalStore) else None

    @property
    def _endpoint(self) -> str | None:
        """The server an fsspec URL talks to, where its filesystem says (s3fs: ``endpoint_url`` when
        not AWS's default; Hugging Face: ``endpoint``), for error messages."""
        fs = getattr(self._fs, "sync_fs", self._fs)  # zarr wraps synchronous filesystems
        return getattr(fs, "endpoint_url", None) or getattr(fs, "endpoint", None)

    @property
    def _fs(self) -> Any:
        """The fsspec filesystem of an FsspecStore (async API), or None."""
        return self.store.fs if isinstance(self.store, FsspecStore) else None

    @property
    def is_s3(self) -> bool:
        fs = self._fs
        if fs is None:
            return False
        protocol = fs.protocol
        return bool(_S3_PROTOCOLS & ({protocol} if isinstance(protocol, str) else set(protocol)))

    def _fs_path(self, key: str) -> str:
        root = self.store.path.rstrip("/")  # type: ignore[attr-defined]
        return f"{root}/{key}" if root else key

    # --- bytes and JSON ------------------------------------------------------------------------
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
        self.write_bytes(key, json.dumps(obj, indent=1, sort_keys=True).encode())

    def exists(self, key: str) -> bool:
        return bool(sync(self.store.exists(key)))

    def delete(self, key: str) -> None:
        sync(self.store.delete(key))

    def delete_prefix(self, prefix: str) -> None:
        prefix = prefix.rstrip("/")
        sync(self.store.delete_dir(prefix))

    def _hidden(self, key: str) -> bool:
        """Local-disk artefacts that are not objects: temporary files of writes in progress
        (``<name>.<32 hex>.partial``, zarr's and ours) and the lease lock file. Hiding them keeps
        listings the same as on object stores, where they do not exist (a listing taken during a
        write would otherwise show ``p-0001.<uuid>.partial`` as if it were a record)."""
        return isinstance(self.store, LocalStore) and (
            _PARTIAL.search(key) is not None or key == f"{LEASES_PREFIX}/.lock"
        )

    def list_dir(self, prefix: str) -> list[str]:
        """Immediate children (names) below ``prefix``, sorted."""
        prefix = self._dir_prefix(prefix)

        async def collect() -> list[str]:
            return [k async for k in self.store.list_dir(prefix)]

        return sorted({k.rstrip("/") for k in sync(collect()) if not self._hidden(prefix + k.rstrip("/"))})

    @staticmethod
    def _dir_prefix(prefix: str) -> str:
        """``"a"`` and ``"a/"`` both mean the directory ``a/``: zarr's MemoryStore matches plain string
        prefixes (``"a"`` would also match ``"ab/..."``) while LocalStore and FsspecStore match
        directories; normalising gives every backend the directory meaning."""
        prefix = prefix.strip("/")
        return f"{prefix}/" if prefix else ""

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

    # --- exclusive create ----------------------------------------------------------------------
    def _check_writable(self, what: str) -> None:
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
        self._check_writable("create_exclusive")
        if isinstance(self.store, LocalStore):
            return self._local_create_exclusive(Path(self.store.root) / key, data)
        if isinstance(self.store, MemoryStore):
            buf = default_buffer_prototype().buffer.from_bytes(data)
            # dict.setdefault is atomic under the GIL: the stored value is ours only if we won.
            return self.store._store_dict.setdefault(key, buf) is buf
        if self.is_s3 and self._s3_caps()[0]:
            return self._s3_create(key, data)
        with _PROCESS_LOCK:
            if self.exists(key):
                return False
            self.write_bytes(key, data)
            return True

    @staticmethod
    def _local_create_exclusive(path: Path, data: bytes) -> bool:
        """Write a temporary file completely, then ``link(2)`` it to the key: link fails if the key
        exists, so creation is atomic and the object is complete from the moment it appears."""
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

    def _s3_create(self, key: str, data: bytes) -> bool:
        try:
            sync(self._fs._pipe_file(self._fs_path(key), data, mode="create"))
        except Exception as err:
            if _s3_lost_race(err):
                return False
            raise
        return True

    def _s3_caps(self) -> tuple[bool, bool]:
        """Whether the endpoint honours conditional PUTs and conditional DELETEs.

        S3-compatible servers that do not know the headers ignore them and overwrite or delete
        silently, so we check once with a probe object (5 requests) instead of trusting them.
        """
        if self._s3_conditional is None:
            fs = self._fs
            bucket, probe, _ = fs.split_path(self._fs_path(f"{LEASES_PREFIX}/.probe-{uuid.uuid4().hex}"))

            async def call(method: str, **kwargs: Any) -> bool:
                try:
                    await fs._call_s3(method, Bucket=bucket, Key=probe, **kwargs)
                except Exception as err:
                    if _s3_lost_race(err):
                        return False
                    raise
                return True

            async def run() -> tuple[bool, bool]:
                await call("put_object", Body=b"probe")
                try:
                    put_ok = not await call("put_object", Body=b"again", IfNoneMatch="*")
                    put_ok = put_ok and not await call("put_object", Body=b"again", IfMatch='"0"')
                    delete_ok = not await call("delete_object", IfMatch='"0"')
                finally:
                    await call("delete_object")
                return put_ok, delete_ok

            self._s3_conditional = sync(run())
            if not self._s3_conditional[0]:
                log.warning(
                    "%s: the S3 endpoint ignores conditional writes (If-None-Match/If-Match); "
                    "create_exclusive and leases are best effort between hosts",
                    self.url,
                )
        return self._s3_conditional

    @property
    def lease_safety(self) -> LeaseSafety:
        """How far ``create_exclusive`` and leases can be trusted here (see the module docstring).

        "atomic": exact between processes (local disk: on this host / a filesystem with working
        ``link`` and locks; S3: between any hosts). "in-process": the store lives in this process,
        and is exact for it. "best-effort": a race window of one round trip between processes.
        May probe the endpoint (S3), which needs write access.
        """
        if isinstance(self.store, LocalStore):
            return "atomic"
        if isinstance(self.store, MemoryStore) or "memory" in getattr(self._fs, "protocol", ()):
            return "in-process"
        if self.is_s3:
            self._check_writable("probing conditional writes")
            return "atomic" if self._s3_caps()[0] else "best-effort"
        return "best-effort"

    # --- versioned read and compare-and-swap (the primitives leases are built on) --------------
    @contextlib.contextmanager
    def _serialised(self) -> Iterator[None]:
        """Mutual exclusion for read-compare-write where the backend has no conditional write:
        a process-wide thread lock, plus ``flock`` on local disk so that other processes (which
        also take it) wait too. The lock file is never deleted: a lock on a deleted file would not
        exclude a process that opens a new one."""
        with _PROCESS_LOCK:
            if not isinstance(self.store, LocalStore):
                yield
                return
            lock_path = Path(self.store.root) / LEASES_PREFIX / ".lock"
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    def _uses_conditional_s3(self) -> bool:
        return self.is_s3 and self._s3_caps()[0]

    def _read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """The object and a token that changes whenever it is rewritten (S3: the ETag, read in the
        same request as the body; elsewhere: the content's sha256), or None if absent."""
        if not self._uses_conditional_s3():
            data = self.read_bytes(key)
            return None if data is None else (data, _digest(data))
        return self._s3_get(key)

    def _s3_get(self, key: str) -> tuple[bytes, str] | None:
        """One GET of ``key``: its bytes and ETag, or None if absent. (s3fs's own read first sends a
        HEAD, whose failure carries no S3 error code.)"""
        fs = self._fs
        bucket, s3_key, _ = fs.split_path(self._fs_path(key))

        async def get() -> tuple[bytes, str] | None:
            try:
                response = await fs._call_s3("get_object", Bucket=bucket, Key=s3_key)
            except FileNotFoundError:
                return None
            try:
                body = await response["Body"].read()
            finally:
                response["Body"].close()
            return body, str(response["ETag"])

        return sync(get())

    def _swap(self, key: str, token: str | None, data: bytes | None) -> bool:
        """Replace the object whose token is ``token`` (None: the object must be absent) with
        ``data`` (None: delete it). True if this call did so; False if someone changed it first."""
        if self._uses_conditional_s3():
            return self._s3_swap(key, token, data)
        with self._serialised():
            current = self.read_bytes(key)
            if (current is None) != (token is None) or (current is not None and _digest(current) != token):
                return False
            if data is None:
                self.delete(key)
            elif token is None:
                return self.create_exclusive(key, data)
            else:
                self.write_bytes(key, data)
            return True

    def _s3_swap(self, key: str, token: str | None, data: bytes | None) -> bool:
        if token is None:
            return True if data is None else self._s3_create(key, data)
        fs = self._fs
        path = self._fs_path(key)
        bucket, s3_key, _ = fs.split_path(path)
        if data is None and not self._s3_caps()[1]:
            # No conditional DELETE on this endpoint: retire the object with a conditional PUT of an
            # empty tombstone instead, which lease reads treat as absent.
            data = b""
        try:
            if data is None:
                sync(fs._call_s3("delete_object", Bucket=bucket, Key=s3_key, IfMatch=token))
            else:
                sync(fs._call_s3("put_object", Bucket=bucket, Key=s3_key, Body=data, IfMatch=token))
        except FileNotFoundError:
            return False  # deleted meanwhile
        except Exception as err:
            if _s3_lost_race(err):
                return False
            raise
        finally:
            fs.invalidate_cache(path)
        return True

    # --- leases --------------------------------------------------------------------------------
    @staticmethod
    def lease_key(name: str) -> str:
        if not isinstance(name, str) or not _LEASE_NAME.fullmatch(name):
            raise ValueError(
                f"lease name {name!r}: use letters, digits, '.', '_', '-' and '/' "
                "(not starting with '.' or '-', no empty components)"
            )
        return f"{LEASES_PREFIX}/{name}.json"

    @staticmethod
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

    def read_lease(self, name: str) -> dict[str, Any] | None:
        """The current record of lease ``name`` (owner, host, pid, expires, acquired, renewed, token),
        expired or not; None if nobody holds or held it."""
        return self._parse_lease(self.read_bytes(self.lease_key(name)))

    @staticmethod
    def _check_lease_args(owner: str, ttl_s: float | None) -> None:
        if not isinstance(owner, str) or not owner:
            raise ValueError("lease owner must be a non-empty string")
        if ttl_s is not None and not (isinstance(ttl_s, (int, float)) and math.isfinite(ttl_s) and ttl_s > 0):
            raise ValueError(f"lease ttl_s must be a positive number of seconds, not {ttl_s!r}")

    @staticmethod
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

    def _write_lease(self, key: str, token: str | None, record: dict[str, Any]) -> bool:
        if self._swap(key, token, json.dumps(record, indent=1, sort_keys=True).encode()):
            return True
        current = self._parse_lease(self.read_bytes(key))
        return current is not None and current.get("token") == record["token"]

    def acquire_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        """Take lease ``name`` for ``owner`` for ``ttl_s`` seconds; True if ``owner`` now holds it.

        Succeeds if the lease is free, released, expired (its holder died or stopped renewing), or
        already held by ``owner`` (then it is extended). Fails (False) while another owner's lease
        has not expired. Of several callers racing for a free or expired lease, exactly one wins
        where :attr:`lease_safety` is not "best-effort". ``owner`` identifies the holder: make it
        unique per worker (e.g. ``f"{host}:{pid}:{uuid4()}"``); two workers sharing one owner string
        share the lease. Expiry compares wall clocks: hosts must agree to well within ``ttl_s``.
        """
        key = self.lease_key(name)
        self._check_lease_args(owner, ttl_s)
        self._check_writable("acquire_lease")
        for _ in range(_MAX_LEASE_ATTEMPTS):
            now = self.clock()
            current = self._read_versioned(key)
            held = self._parse_lease(current[0] if current else None)
            if held is not None and held["owner"] != owner and float(held.get("expires", 0)) > now:
                return False
            record = self._lease_record(owner, ttl_s, now, held)
            if self._write_lease(key, current[1] if current else None, record):
                return True
            # Someone changed the lease between our read and write: look again.
        return False

    def renew_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        """Extend ``owner``'s lease to ``ttl_s`` seconds from now. False means ``owner`` no longer holds
        it (released, or expired and taken over): stop the guarded work. A lease that expired but
        that nobody took over is still ``owner``'s and is renewed."""
        key = self.lease_key(name)
        self._check_lease_args(owner, ttl_s)
        self._check_writable("renew_lease")
        for _ in range(_MAX_LEASE_ATTEMPTS):
            current = self._read_versioned(key)
            held = self._parse_lease(current[0] if current else None)
            if current is None or held is None or held["owner"] != owner:
                return False
            record = self._lease_record(owner, ttl_s, self.clock(), held)
            if self._write_lease(key, current[1], record):
                return True
        return False

    def release_lease(self, name: str, owner: str) -> bool:
        """Give up ``owner``'s lease so that others can take it at once. True if this call removed
        it; False if ``owner`` did not hold it (never did, or it was taken over). Never removes
        another owner's lease, even one written between our read and our delete."""
        key = self.lease_key(name)
        self._check_lease_args(owner, None)
        self._check_writable("release_lease")
        for _ in range(_MAX_LEASE_ATTEMPTS):
            current = self._read_versioned(key)
            held = self._parse_lease(current[0] if current else None)
            if current is None or held is None or held["owner"] != owner:
                return False
            if self._swap(key, current[1], None):
                return True
        return False

    # --- zarr ----------------------------------------------------------------------------------
    def open_array(self, path: str) -> zarr.Array:
        return zarr.open_array(self.store, path=path, mode="r")

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

"""The fsspec backend: any URL an fsspec filesystem serves (``memory://``, ``gs://``, ``hf://``,
``https://``, ...) through zarr's ``FsspecStore``; ``s3://`` gets its subclass in ``store_s3.py``.

Opening makes the first request (one GET of ``zarr.json``) so that a failure says at once what to
check: rejected credentials, a request a policy denies, a server that cannot be reached
(:meth:`FsspecStorage.request_error`). Coordination is a check-then-write under a process-local
lock: "in-process" for ``memory://`` (only this process sees it), "best-effort" elsewhere.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from zarr.storage import FsspecStore

from selkd.cache.store import LeaseSafety, Storage, StoreError

_T = TypeVar("_T")

S3_PROTOCOLS = {"s3", "s3a"}
# S3 error codes meaning "these credentials are not valid here" (unknown key, wrong secret, expired
# session), as opposed to AccessDenied: "valid, but a policy does not allow this request". Other
# S3-compatible services and fsspec filesystems built on botocore carry the same codes.
_BAD_CREDENTIALS = {
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


def url_protocols(location: str) -> list[str]:
    """Protocols of a (possibly chained, ``simplecache::s3://...``) fsspec URL."""
    return [part.split("://", 1)[0] for part in location.split("::")]


def _check_protocols(location: str) -> None:
    """Reject unknown schemes up front: fsspec's own error ('Protocol not known') does not say what
    we accept."""
    from fsspec.registry import known_implementations, registry

    for protocol in url_protocols(location):
        if protocol not in registry and protocol not in known_implementations:
            raise StoreError(
                f"{location}: unknown URL scheme {protocol + '://'!r}; use a local directory, "
                "s3://bucket/prefix, or another fsspec URL (memory://, gs://, ...)"
            )


def error_code(err: BaseException) -> str | None:
    """The S3 error code (``AccessDenied``, ``412``, ...) of ``err`` as raised by s3fs, which translates
    botocore's ClientError into an OSError raised from it; None if it carries none."""
    for e in (err, err.__cause__):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code"):
            return str(response["Error"]["Code"])
    return None


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


class FsspecStorage(Storage):
    """A cache behind an fsspec URL."""

    store: FsspecStore
    # What to check when a request is denied (the S3 backend names the IAM actions).
    ACCESS_HINT = "the credentials and permissions in the storage options"

    @classmethod
    def open_url(cls, location: str, storage_options: Mapping[str, Any] | None, mode: str) -> FsspecStorage:
        """Open ``location`` (mode "r": a cache must be there) with the backend its protocol needs."""
        from selkd.cache.store_s3 import S3Storage

        _check_protocols(location)
        kind = S3Storage if url_protocols(location)[-1] in S3_PROTOCOLS else FsspecStorage
        options = kind.default_options(dict(storage_options or {}))
        try:
            store = FsspecStore.from_url(location, storage_options=options, read_only=(mode == "r"))
        except ImportError as err:
            raise StoreError(
                f"{location}: the filesystem for this URL is not installed ({err}); "
                "for s3:// run `pip install selkd[s3]`"
            ) from err
        except Exception as err:
            raise StoreError(f"{location}: cannot open ({type(err).__name__}: {err})") from err
        storage = kind(store, location)
        storage.check_open(mode)
        return storage

    @staticmethod
    def default_options(options: dict[str, Any]) -> dict[str, Any]:
        """The filesystem's options with this backend's defaults filled in (none for plain fsspec)."""
        return options

    def check_open(self, mode: str) -> None:
        """The first request: one GET of ``zarr.json``, not a HEAD (a failed GET says why; fsspec's http
        ``exists`` turns an unreachable host into False). Every reader and writer needs this object."""
        found = self.first_request("reading zarr.json", self.read_root)
        if mode == "r" and found is None:
            raise StoreError(f"{self.url}: no cache there (no zarr.json); check the URL and storage options")

    def read_root(self) -> object | None:
        """``zarr.json``, or None if absent (any failure raised as it comes)."""
        return self.read_bytes("zarr.json")

    def first_request(self, doing: str, call: Callable[[], _T]) -> _T:
        """``call()``, with a failure turned into one :class:`StoreError` that says what to do."""
        try:
            return call()
        except StoreError:
            raise
        except Exception as err:
            raise self.request_error(err, doing) from err

    def request_error(self, err: BaseException, doing: str) -> StoreError:
        """What a failed request means for the user: rejected credentials, a request the credentials
        may not make, a server that cannot be reached, or else the error itself."""
        where = f" at {self.endpoint}" if self.endpoint else ""
        code = error_code(err)
        reason = f"{code or type(err).__name__}: {err}"
        if code in _BAD_CREDENTIALS:
            return StoreError(
                f"{self.url}: the S3 endpoint{where} rejected the credentials ({reason}); check the access key "
                "and secret (storage options key/secret, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) or the "
                "profile (AWS_PROFILE)"
            )
        if code == "AccessDenied" or isinstance(err, PermissionError):
            return StoreError(f"{self.url}: access denied {doing}{where} ({reason}); check {self.ACCESS_HINT}")
        if _unreachable(err):
            return StoreError(
                f"{self.url}: cannot reach the server{where} ({reason}); check the URL and the network "
                "(no network, a proxy or firewall in the way, or the server is down)"
            )
        return StoreError(f"{self.url}: failed {doing}{where} ({reason})")

    @property
    def fs(self) -> Any:
        """The fsspec filesystem (async API)."""
        return self.store.fs

    @property
    def endpoint(self) -> str | None:
        """The server the URL talks to, where its filesystem says (s3fs: ``endpoint_url`` when not
        AWS's default; Hugging Face: ``endpoint``), for error messages."""
        fs = getattr(self.fs, "sync_fs", self.fs)  # zarr wraps synchronous filesystems
        return getattr(fs, "endpoint_url", None) or getattr(fs, "endpoint", None)

    def fs_path(self, key: str) -> str:
        """``key``'s path on the filesystem (below the URL's root)."""
        root = self.store.path.rstrip("/")
        return f"{root}/{key}" if root else key

    def _hidden(self, key: str) -> bool:
        """The store's own root path, which s3fs's ``find`` returns when a listing came back empty and
        the prefix appeared just after (its follow-up ``info`` then finds a "directory"): not a key."""
        return key == self.store.path.rstrip("/")

    @property
    def lease_safety(self) -> LeaseSafety:
        return "in-process" if "memory" in self.fs.protocol else "best-effort"

    def _create_if_absent(self, key: str, data: bytes) -> bool:
        return self._create_checked(key, data)

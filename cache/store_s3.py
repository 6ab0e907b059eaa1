"""The S3 backend (AWS S3, Ceph RGW, moto): an fsspec backend (s3fs) with conditional writes.

With conditional writes ("atomic"; AWS S3, Ceph RGW, moto 5.2.5): ``PUT If-None-Match: *`` to
create, ``PUT If-Match: <etag>`` to replace, ``DELETE If-Match: <etag>`` to remove; the server
decides, so exact between any number of hosts. Support is probed once per storage (servers that do
not know the headers ignore them); without conditional DELETE a released lease is overwritten
(If-Match) by an empty tombstone instead of deleted. An endpoint that ignores the conditions gets
the fsspec fallback ("best-effort") and a warning.

Opening checks the bucket (one HEAD) before the first GET, and in mode "w" probes the conditions,
which also checks that the credentials may write (PUT and DELETE).
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from typing import Any

from zarr.core.sync import sync

from selkd.cache.store import LeaseSafety, StoreError
from selkd.cache.store_fsspec import FsspecStorage, error_code

log = logging.getLogger(__name__)

# S3 error codes meaning "your condition did not hold" (412) or "a concurrent conditional write is
# in flight, you lost" (409): both mean another writer got there first.
_LOST_RACE = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
# The probe object of conditional writes: at the root, so that listings can hide it (another worker
# opening the same empty store must not take it for foreign contents).
_PROBE = re.compile(r"\.selkd-probe-[0-9a-f]{32}")


def _lost_race(err: BaseException) -> bool:
    """True if ``err`` (as raised by s3fs, which wraps botocore's ClientError) is a failed condition."""
    if isinstance(err, FileExistsError):  # s3fs's translation of 412 for If-None-Match
        return True
    return error_code(err) in _LOST_RACE


class S3Storage(FsspecStorage):
    """A cache at ``s3://bucket/prefix``."""

    ACCESS_HINT = (
        "the bucket policy and the IAM policy of these credentials (s3:GetObject, s3:PutObject, "
        "s3:DeleteObject and s3:ListBucket on the bucket and prefix), or use other credentials "
        "(key/secret, AWS_PROFILE)"
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Conditional-write support, probed on first use: (PUT If-None-Match / If-Match, DELETE If-Match).
        self._s3_conditional: tuple[bool, bool] | None = None

    # --- opening ---------------------------------------------------------------------------------------
    @staticmethod
    def default_options(options: dict[str, Any]) -> dict[str, Any]:
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

    def check_open(self, mode: str) -> None:
        """The bucket, then ``zarr.json``; a writer's first write is the probe of conditional writes
        (PUT and DELETE), not a part's array."""
        self._check_bucket()
        super().check_open(mode)
        if mode == "w":
            self.first_request("writing a probe object", self._caps)

    def read_root(self) -> object | None:
        return self._get("zarr.json")

    def _hidden(self, key: str) -> bool:
        """Probe objects of conditional writes (other workers' probes, while they open the store)."""
        return _PROBE.fullmatch(key) is not None or super()._hidden(key)

    def _check_bucket(self) -> None:
        """One HEAD on the bucket: a missing bucket otherwise shows up as 'no such key' much later
        (or, in mode "r", as a misleading 'no cache there')."""
        bucket = self.fs.split_path(self.store.path)[0]
        where = f" at {self.endpoint}" if self.endpoint else ""
        try:
            sync(self.fs._call_s3("head_bucket", Bucket=bucket))
        except FileNotFoundError as err:
            raise StoreError(
                f"{self.url}: bucket {bucket!r} does not exist{where}; create it first or check the URL "
                "and the endpoint (storage option endpoint_url or AWS_ENDPOINT_URL)"
            ) from err
        except PermissionError:
            # HeadBucket needs s3:ListBucket, which a reader limited to one prefix may lack, and a HEAD's
            # 403 has no body to tell wrong credentials from a policy: the GET of zarr.json that follows
            # (in check_open) decides and says which.
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

    # --- conditional writes ------------------------------------------------------------------------------
    def _caps(self) -> tuple[bool, bool]:
        """Whether the endpoint honours conditional PUTs and conditional DELETEs.

        S3-compatible servers that do not know the headers ignore them and overwrite or delete
        silently, so we check once with a probe object (5 requests) instead of trusting them.
        """
        if self._s3_conditional is None:
            fs = self.fs
            bucket, probe, _ = fs.split_path(self.fs_path(f".selkd-probe-{uuid.uuid4().hex}"))

            async def call(method: str, **kwargs: Any) -> bool:
                try:
                    await fs._call_s3(method, Bucket=bucket, Key=probe, **kwargs)
                except Exception as err:
                    if _lost_race(err):
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

    def _conditional(self) -> bool:
        return self._caps()[0]

    @property
    def lease_safety(self) -> LeaseSafety:
        """May probe the endpoint, which needs write access."""
        self.check_writable("probing conditional writes")
        return "atomic" if self._conditional() else "best-effort"

    def _create_if_absent(self, key: str, data: bytes) -> bool:
        if not self._conditional():
            return super()._create_if_absent(key, data)
        try:
            sync(self.fs._pipe_file(self.fs_path(key), data, mode="create"))
        except Exception as err:
            if _lost_race(err):
                return False
            raise
        return True

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """With conditional writes: the body and its ETag, in one GET."""
        return self._get(key) if self._conditional() else super().read_versioned(key)

    def _get(self, key: str) -> tuple[bytes, str] | None:
        """One GET of ``key``: its bytes and ETag, or None if absent. (s3fs's own read first sends a
        HEAD, whose failure carries no S3 error code.)"""
        fs = self.fs
        bucket, s3_key, _ = fs.split_path(self.fs_path(key))

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

    def swap(self, key: str, token: str | None, data: bytes | None) -> bool:
        """With conditional writes: the server compares ETags (PUT / DELETE If-Match)."""
        if not self._conditional():
            return super().swap(key, token, data)
        if token is None:
            return True if data is None else self._create_if_absent(key, data)
        path = self.fs_path(key)
        bucket, s3_key, _ = self.fs.split_path(path)
        if data is None and not self._caps()[1]:
            # No conditional DELETE on this endpoint: retire the object with a conditional PUT of an
            # empty tombstone instead, which lease reads treat as absent.
            data = b""
        try:
            if data is None:
                sync(self.fs._call_s3("delete_object", Bucket=bucket, Key=s3_key, IfMatch=token))
            else:
                sync(self.fs._call_s3("put_object", Bucket=bucket, Key=s3_key, Body=data, IfMatch=token))
        except FileNotFoundError:
            return False  # deleted meanwhile
        except Exception as err:
            if _lost_race(err):
                return False
            raise
        finally:
            self.fs.invalidate_cache(path)
        return True

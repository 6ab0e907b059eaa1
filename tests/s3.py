"""A real S3 endpoint for tests: moto's S3 server app on 127.0.0.1, in a thread of the test process.

Not a test module: fixtures wrap these functions (see ``tests/test_store.py``). Usage::

    with moto_s3() as s3:                      # s3.endpoint_url, s3.bucket, s3.storage_options
        storage = Storage.open(s3.url("my/prefix"), storage_options=s3.storage_options, mode="w")

    set_aws_env(monkeypatch, s3)               # code that reads only the standard AWS variables
    storage = Storage.open(s3.url("my/prefix"), mode="w")

    with moto_s3_authenticated() as s3:        # IAM authentication on: wrong keys get a 403
        Storage.open(s3.url("p"), storage_options=s3.options("writer"), mode="w")

The server is moto's own WSGI app (what ``moto_server`` and ``ThreadedMotoServer`` run) served by a
*single-threaded* werkzeug server. moto checks S3 conditions (If-None-Match / If-Match) and then
writes in two steps without a lock, so a multi-threaded server can let two racing conditional PUTs
both succeed, which real S3 never does. Serving one request at a time makes each request atomic, as
on S3, so race tests mean something. It is fast enough: a request takes about a millisecond.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest

REGION = "us-east-1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"

# Variables that would make botocore ignore or override what set_aws_env sets.
_CONFLICTING_AWS_ENV = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_REGION",
)


class S3Endpoint(NamedTuple):
    """What a test needs to reach the server; unpacks as ``(endpoint_url, bucket, storage_options)``."""

    endpoint_url: str
    bucket: str
    storage_options: dict[str, Any]

    def url(self, prefix: str = "") -> str:
        """``s3://<bucket>/<prefix>``: give each test its own prefix (the bucket is shared)."""
        return f"s3://{self.bucket}/{prefix.strip('/')}" if prefix else f"s3://{self.bucket}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point botocore/s3fs at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }


def require_s3() -> None:
    """Skip (with the reason) where the S3 test dependencies are missing; CI installs them."""
    reason = 'S3 tests need `pip install "moto[server]" s3fs boto3` (the dev extra)'
    for module in ("moto.moto_server.werkzeug_app", "werkzeug", "boto3", "s3fs"):
        pytest.importorskip(module, reason=reason)


def _boto3_client(endpoint_url: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
    )


def _wait_until_answers(endpoint_url: str, timeout_s: float) -> None:
    """The socket listens as soon as the server exists; wait until requests are really served."""
    client = _boto3_client(endpoint_url)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.list_buckets()
            return
        except Exception as err:
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto S3 server at {endpoint_url} did not answer in {timeout_s} s") from err
            time.sleep(0.05)


def _make_server() -> Any:
    """moto's WSGI app in a single-threaded werkzeug server on 127.0.0.1, on a port the OS chooses."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    # werkzeug logs every request at INFO; keep the test output readable.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    return make_server(
        "127.0.0.1",
        0,
        DomainDispatcherApplication(create_backend_app),
        threaded=False,
        request_handler=MotoRequestHandler,
    )


@contextlib.contextmanager
def moto_s3(bucket: str | None = None, timeout_s: float = 30.0) -> Iterator[S3Endpoint]:
    """Start moto's S3 server on 127.0.0.1 (a free port chosen by the OS), create ``bucket`` (default:
    a unique name), yield the endpoint, and stop the server on exit.

    The server keeps state in moto's process-global backends: buckets made here are visible to
    anything else in this process that uses moto.
    """
    require_s3()
    server = _make_server()
    thread = threading.Thread(target=server.serve_forever, name="moto-s3", daemon=True)
    thread.start()
    try:
        endpoint_url = f"http://127.0.0.1:{server.server_port}"
        _wait_until_answers(endpoint_url, timeout_s)
        bucket = bucket or f"selkd-test-{uuid.uuid4().hex[:12]}"
        _boto3_client(endpoint_url).create_bucket(Bucket=bucket)
        yield S3Endpoint(
            endpoint_url=endpoint_url,
            bucket=bucket,
            storage_options={"endpoint_url": endpoint_url, "key": ACCESS_KEY, "secret": SECRET_KEY},
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def set_aws_env(monkeypatch: pytest.MonkeyPatch, endpoint: S3Endpoint) -> None:
    """Point the standard AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_DEFAULT_REGION) at ``endpoint`` for one test; ``monkeypatch`` undoes it afterwards.

    Also hides what could override those from the developer's machine: profiles, session tokens,
    AWS_ENDPOINT_URL_S3 (which botocore prefers to AWS_ENDPOINT_URL) and ~/.aws files.
    """
    for name in _CONFLICTING_AWS_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    for name, value in endpoint.env().items():
        monkeypatch.setenv(name, value)


# --- with IAM authentication ---------------------------------------------------------------------

# The users of the authenticated server and what their IAM policies allow ("writer": everything on S3,
# "reader": reading and listing only, "nobody": no policy, so every request is denied).
_USER_POLICIES: dict[str, list[str]] = {
    "writer": ["s3:*"],
    "reader": ["s3:GetObject", "s3:ListBucket"],
    "nobody": [],
}


class AuthS3Endpoint(NamedTuple):
    """An S3 server that checks signatures and IAM policies, with one access key per user of
    ``_USER_POLICIES``; ``options(user)`` are that user's storage options."""

    endpoint_url: str
    bucket: str
    keys: dict[str, tuple[str, str]]  # user -> (access key id, secret)

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix.strip('/')}" if prefix else f"s3://{self.bucket}"

    def options(self, user: str, **override: str) -> dict[str, Any]:
        key, secret = self.keys[user]
        return {"endpoint_url": self.endpoint_url, "key": key, "secret": secret, **override}


def _create_users(endpoint_url: str) -> dict[str, tuple[str, str]]:
    import boto3

    iam = boto3.client(
        "iam", endpoint_url=endpoint_url, aws_access_key_id="setup", aws_secret_access_key="setup", region_name=REGION
    )
    keys = {}
    for user, actions in _USER_POLICIES.items():
        iam.create_user(UserName=user)
        if actions:
            policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
            iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(policy))
        created = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = (created["AccessKeyId"], created["SecretAccessKey"])
    return keys


@contextlib.contextmanager
def moto_s3_authenticated(timeout_s: float = 60.0) -> Iterator[AuthS3Endpoint]:
    """moto's S3 server with IAM authentication switched on, in a child process.

    moto decides in process-global state whether to check requests (``INITIAL_NO_AUTH_ACTION_COUNT``:
    the number of requests served before checking starts), so this server runs in its own process
    and the shared one (:func:`moto_s3`) keeps accepting any key. The child starts with checking off
    (the variable set to ``inf``), the users, their keys and a bucket are created, then checking is
    switched on for every later request through moto's ``/moto-api/reset-auth`` (what moto's
    ``set_initial_no_auth_action_count`` does in server mode). The child exits when this context
    closes its stdin, or when the test process dies.
    """
    require_s3()
    import urllib.request

    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "inf"}
    proc = subprocess.Popen(
        [sys.executable, __file__, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        port = proc.stdout.readline().strip()
        if not port.isdigit():
            raise RuntimeError(f"the authenticated moto server did not start (exit status {proc.poll()})")
        endpoint_url = f"http://127.0.0.1:{port}"
        _wait_until_answers(endpoint_url, timeout_s)
        keys = _create_users(endpoint_url)
        bucket = f"selkd-auth-{uuid.uuid4().hex[:12]}"
        writer_key, writer_secret = keys["writer"]
        import boto3

        boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=writer_key,
            aws_secret_access_key=writer_secret,
            region_name=REGION,
        ).create_bucket(Bucket=bucket)
        # text/plain: with urllib's default form type, werkzeug would consume the body as a form.
        switch_on = urllib.request.Request(
            f"{endpoint_url}/moto-api/reset-auth", data=b"0", headers={"Content-Type": "text/plain"}
        )
        urllib.request.urlopen(switch_on, timeout=timeout_s).close()
        yield AuthS3Endpoint(endpoint_url=endpoint_url, bucket=bucket, keys=keys)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _serve_until_stdin_closes() -> None:
    """The child of :func:`moto_s3_authenticated`: print the port, serve until stdin closes."""
    server = _make_server()
    threading.Thread(target=server.serve_forever, name="moto-s3-auth", daemon=True).start()
    print(server.server_port, flush=True)
    sys.stdin.read()


if __name__ == "__main__" and sys.argv[1:] == ["serve"]:
    _serve_until_stdin_closes()

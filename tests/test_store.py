"""The Storage contract, run against every backend the cache supports.

One suite, parametrised over: a local directory, ``Storage.memory()``, an fsspec ``memory://`` URL,
and S3 (moto's server on 127.0.0.1) reached once through storage options and once through the
standard AWS environment only. A behaviour that differs between backends is a bug in the
backend's class (``cache/store_*.py``), not something callers should work around; a new backend is
added to ``BACKENDS`` / ``open_backend`` and runs the whole contract.
"""

from __future__ import annotations

import ast
import json
import multiprocessing
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.core.sync import sync

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from s3 import AuthS3Endpoint, S3Endpoint  # tests/ is on sys.path (conftest)

from selkd.cache.leases import acquire_lease, read_lease, release_lease, renew_lease
from selkd.cache.store import Storage, StoreError
from selkd.cache.store_fsspec import FsspecStorage
from selkd.cache.store_local import LocalStorage
from selkd.cache.store_memory import MemoryStorage
from selkd.cache.store_s3 import S3Storage
from selkd.cache.writer import write_array

BACKENDS = ["local", "memory", "fsspec-memory", "s3-options", "s3-env"]


def _unique(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:10]}"


def open_backend(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """A fresh, empty, writable Storage of ``kind``."""
    if kind == "local":
        return Storage.open(tmp_path / "cache", mode="w")
    if kind == "memory":
        return Storage.memory()
    if kind == "fsspec-memory":
        return Storage.open(f"memory://{_unique('selkd')}", mode="w")
    if kind == "s3-options":
        s3: S3Endpoint = request.getfixturevalue("s3_endpoint")
        return Storage.open(s3.url(_unique("opts")), storage_options=s3.storage_options, mode="w")
    if kind == "s3-env":
        s3 = request.getfixturevalue("aws_env")
        return Storage.open(s3.url(_unique("env")), mode="w")
    raise AssertionError(kind)


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    return open_backend(request.param, request, tmp_path)


class Clock:
    """A settable clock for lease expiry, so no test sleeps."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def race(n: int, target: Callable[[int], bool]) -> list[bool]:
    """Run ``target(i)`` in ``n`` threads released together; their results in thread order."""
    barrier = threading.Barrier(n)
    results: list[bool | BaseException] = [False] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = target(i)
        except BaseException as err:
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]


# --- the contract -------------------------------------------------------------------------------


def test_bytes_and_json(storage: Storage) -> None:
    assert storage.read_bytes("a/missing.bin") is None
    assert storage.read_json("a/missing.json") is None
    assert not storage.exists("a/x.bin")
    storage.write_bytes("a/x.bin", b"\x00\x01payload")
    assert storage.exists("a/x.bin")
    assert storage.read_bytes("a/x.bin") == b"\x00\x01payload"
    storage.write_bytes("a/x.bin", b"replaced")  # overwrite replaces the whole object
    assert storage.read_bytes("a/x.bin") == b"replaced"
    storage.write_bytes("a/empty.bin", b"")
    assert storage.read_bytes("a/empty.bin") == b""
    record = {"part": "p-0001", "n": 3, "nested": {"ids": [1, 2, 3]}, "ok": True, "none": None}
    storage.write_json("selkd/commits/p-0001.json", record)
    assert storage.read_json("selkd/commits/p-0001.json") == record
    storage.write_bytes("bad.json", b"{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        storage.read_json("bad.json")


def test_delete_and_delete_prefix(storage: Storage) -> None:
    for key in ("a/x", "a/b/c", "a/b/d", "ab/y", "top"):
        storage.write_bytes(key, b"12")
    storage.delete("top")
    assert not storage.exists("top")
    storage.delete("top")  # deleting a missing key is not an error
    storage.delete_prefix("a/b/")
    assert storage.list_prefix("") == ["a/x", "ab/y"]
    storage.delete_prefix("a")  # a directory: "ab/..." is not below "a/"
    assert storage.list_prefix("") == ["ab/y"]
    storage.delete_prefix("missing/")
    assert storage.list_prefix("") == ["ab/y"]


def test_listing_size_and_empty(storage: Storage) -> None:
    assert storage.is_empty()
    assert storage.list_dir("") == []
    assert storage.list_prefix("") == []
    assert storage.size_bytes() == 0
    files = {"a/x": b"1", "a/b/c": b"22", "a/b/d": b"333", "ab/y": b"4444", "top": b"55555"}
    for key, data in files.items():
        storage.write_bytes(key, data)
    assert not storage.is_empty()
    assert storage.list_dir("") == ["a", "ab", "top"]  # immediate children: "directories" and objects
    assert storage.list_dir("a") == ["b", "x"]
    assert storage.list_dir("a/") == ["b", "x"]
    assert storage.list_dir("a/b") == ["c", "d"]
    assert storage.list_dir("nope") == []
    assert storage.list_prefix("") == sorted(files)
    assert storage.list_prefix("a") == ["a/b/c", "a/b/d", "a/x"]  # directory, not string, prefix
    assert storage.list_prefix("a/") == ["a/b/c", "a/b/d", "a/x"]
    assert storage.list_prefix("a/b/") == ["a/b/c", "a/b/d"]
    assert storage.list_prefix("nope/") == []
    assert storage.size_bytes() == sum(len(v) for v in files.values())
    assert storage.size_bytes("a/") == storage.size_bytes("a") == 6
    assert storage.size_bytes("nope/") == 0


def test_zarr_array_roundtrip(storage: Storage) -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 151_936, size=(5_000, 8), dtype=np.int32)
    logprobs = rng.standard_normal(20_000).astype(np.float16)
    write_array(storage, "parts/p-0000/class_ids", ids)
    write_array(storage, "parts/p-0000/logprob", logprobs)
    write_array(storage, "parts/p-0000/empty", np.zeros((0, 4), np.int32))
    a = storage.open_array("parts/p-0000/class_ids")
    assert a.shape == ids.shape and a.dtype == ids.dtype
    assert a.shards is not None  # sharded, as the cache writes it
    np.testing.assert_array_equal(a[1234:1300], ids[1234:1300])
    np.testing.assert_array_equal(a[-3:, 2:5], ids[-3:, 2:5])
    np.testing.assert_array_equal(storage.open_array("parts/p-0000/logprob")[19_990:], logprobs[19_990:])
    assert storage.open_array("parts/p-0000/empty").shape == (0, 4)
    assert {"class_ids", "empty", "logprob"} <= set(storage.list_dir("parts/p-0000"))
    assert storage.size_bytes("parts/p-0000/") > 0
    storage.delete_prefix("parts/p-0000")
    assert storage.list_prefix("parts/p-0000/") == []


def test_create_exclusive(storage: Storage) -> None:
    assert storage.create_exclusive("locks/a", b"first")
    assert not storage.create_exclusive("locks/a", b"second")
    assert storage.read_bytes("locks/a") == b"first"  # the loser did not overwrite
    storage.delete("locks/a")
    assert storage.create_exclusive("locks/a", b"third")
    assert storage.read_bytes("locks/a") == b"third"


def test_create_exclusive_race_has_one_winner(storage: Storage) -> None:
    for round_ in range(2):
        key = f"locks/race-{round_}"
        won = race(5, lambda i, key=key: storage.create_exclusive(key, f"writer {i}".encode()))
        assert sum(won) == 1, won
        assert storage.read_bytes(key) == f"writer {won.index(True)}".encode()


def test_lease_acquire_refuse_renew_release(storage: Storage) -> None:
    clock = Clock()
    storage.clock = clock
    assert read_lease(storage, "build") is None
    assert acquire_lease(storage, "build", "worker-a", ttl_s=30)
    record = read_lease(storage, "build")
    assert record is not None
    assert record["owner"] == "worker-a" and record["expires"] == clock.now + 30
    assert {"host", "pid", "acquired", "renewed", "token"} <= set(record)
    raw = storage.read_json("selkd/leases/build.json")  # the documented location and format
    assert raw["owner"] == "worker-a"

    clock.now += 10
    assert not acquire_lease(storage, "build", "worker-b", ttl_s=30)  # held by a live owner
    assert not renew_lease(storage, "build", "worker-b", ttl_s=30)
    assert not release_lease(storage, "build", "worker-b")
    assert read_lease(storage, "build")["owner"] == "worker-a"  # type: ignore[index]

    assert acquire_lease(storage, "build", "worker-a", ttl_s=30)  # re-entrant: extends
    assert renew_lease(storage, "build", "worker-a", ttl_s=60)
    renewed = read_lease(storage, "build")
    assert renewed is not None
    assert renewed["expires"] == clock.now + 60 and renewed["acquired"] == record["acquired"]

    assert release_lease(storage, "build", "worker-a")
    assert read_lease(storage, "build") is None
    assert not release_lease(storage, "build", "worker-a")  # nothing left to release
    assert not renew_lease(storage, "build", "worker-a", ttl_s=30)
    assert acquire_lease(storage, "build", "worker-b", ttl_s=30)  # free again at once
    assert read_lease(storage, "build")["owner"] == "worker-b"  # type: ignore[index]


def test_lease_expired_is_taken_over(storage: Storage) -> None:
    clock = Clock()
    storage.clock = clock
    assert acquire_lease(storage, "parts/p-0007", "dead-worker", ttl_s=5)
    clock.now += 4.9
    assert not acquire_lease(storage, "parts/p-0007", "worker-b", ttl_s=5)
    clock.now += 0.2  # past expiry: the holder stopped renewing
    assert acquire_lease(storage, "parts/p-0007", "worker-b", ttl_s=5)
    assert read_lease(storage, "parts/p-0007")["owner"] == "worker-b"  # type: ignore[index]
    # The old holder wakes up: it must learn that it lost the lease, and cannot disturb the new one.
    assert not renew_lease(storage, "parts/p-0007", "dead-worker", ttl_s=5)
    assert not release_lease(storage, "parts/p-0007", "dead-worker")
    assert read_lease(storage, "parts/p-0007")["owner"] == "worker-b"  # type: ignore[index]
    # An expired lease nobody took over is still its owner's to renew.
    clock.now += 10
    assert renew_lease(storage, "parts/p-0007", "worker-b", ttl_s=5)


def test_lease_takeover_race_has_one_winner(storage: Storage) -> None:
    clock = Clock()
    storage.clock = clock
    for round_ in range(2):
        name = f"race-{round_}"
        assert acquire_lease(storage, name, "dead-worker", ttl_s=1)
        clock.now += 2
        won = race(5, lambda i, name=name: acquire_lease(storage, name, f"worker-{i}", ttl_s=30))
        assert sum(won) == 1, won
        assert read_lease(storage, name)["owner"] == f"worker-{won.index(True)}"  # type: ignore[index]


def test_lease_arguments_are_checked(storage: Storage) -> None:
    for bad in ("", "../x", "/abs", ".hidden", "a//b", "a b"):
        with pytest.raises(ValueError, match="lease name"):
            acquire_lease(storage, bad, "w", ttl_s=1)
    with pytest.raises(ValueError, match="owner"):
        acquire_lease(storage, "ok", "", ttl_s=1)
    for ttl in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="ttl_s"):
            acquire_lease(storage, "ok", "w", ttl_s=ttl)


@pytest.mark.parametrize("kind", ["local", "memory", "fsspec-memory", "s3-options"])
def test_write_bytes_is_atomic_for_readers(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """A reader racing a writer sees a whole old or a whole new object, never a torn or empty one.
    (S3: the server's PUT semantics, checked against moto; local disk: zarr's write-then-rename.)"""
    storage = open_backend(kind, request, tmp_path)
    on_s3 = kind.startswith("s3")
    size, writes = (1 << 18, 10) if on_s3 else (1 << 20, 40)  # moto answers slower: fewer, smaller objects
    storage.write_bytes("obj", b"a" * size)
    stop = threading.Event()
    seen: set[bytes] = set()
    torn: list[int] = []  # lengths of partial reads (-1: absent); a failed assert in a thread would go unseen

    def read() -> None:
        while not stop.is_set():
            data = storage.read_bytes("obj")
            if data is None or len(data) != size or data.count(data[:1]) != size:
                torn.append(-1 if data is None else len(data))
            else:
                seen.add(data[:1])

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(writes):
            storage.write_bytes("obj", (b"b" if i % 2 == 0 else b"a") * size)
    finally:
        stop.set()
        reader.join()
    assert not torn, torn
    assert seen and seen <= {b"a", b"b"}


def test_local_listings_hide_write_artefacts(tmp_path: Path) -> None:
    """Temporary files of writes in progress and the lease lock file are not objects."""
    storage = Storage.open(tmp_path, mode="w")
    storage.write_json("selkd/commits/p-0.json", {})
    (tmp_path / f"selkd/commits/p-1.{uuid.uuid4().hex}.partial").write_bytes(b"half-written")
    assert acquire_lease(storage, "x", "w", ttl_s=5)
    assert (tmp_path / "selkd/leases/.lock").exists()
    assert storage.list_dir("selkd/commits") == ["p-0.json"]
    assert storage.list_dir("selkd/leases") == ["x.json"]
    assert storage.list_prefix("selkd") == ["selkd/commits/p-0.json", "selkd/leases/x.json"]
    assert not storage.create_exclusive("selkd/commits/p-0.json", b"{}")
    assert storage.list_dir("selkd/commits") == ["p-0.json"]  # the loser's temporary file is gone


# --- backend-specific ---------------------------------------------------------------------------


def test_lease_safety_per_backend(tmp_path: Path) -> None:
    assert Storage.open(tmp_path / "c", mode="w").lease_safety == "atomic"
    assert Storage.memory().lease_safety == "in-process"
    assert Storage.open(f"memory://{_unique('m')}", mode="w").lease_safety == "in-process"


@pytest.mark.parametrize(
    "kind, backend",
    [
        ("local", LocalStorage),
        ("memory", MemoryStorage),
        ("fsspec-memory", FsspecStorage),
        ("s3-options", S3Storage),
        ("s3-env", S3Storage),
    ],
)
def test_open_picks_the_backend(kind: str, backend: type, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """``Storage.open`` is the one entry point: it picks one class per backend (no switches on zarr
    store types inside a class)."""
    storage = open_backend(kind, request, tmp_path)
    assert type(storage) is backend
    assert (storage.local_path == tmp_path / "cache") if kind == "local" else storage.local_path is None


ZARR_STORES = {"LocalStore", "MemoryStore", "FsspecStore", "ObjectStore", "ZipStore"}


def test_storage_code_has_no_store_type_switches_or_private_zarr_attributes() -> None:
    """Behaviour that differs per backend is a method of the backend's class: no ``isinstance`` on a
    zarr store type, and no private attribute of a zarr object (``_store_dict``, ...)."""
    cache = Path(__file__).resolve().parent.parent / "cache"
    found = []
    for path in sorted(cache.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                found += [f"{path.name}:{node.lineno} isinstance {n}" for n in names & ZARR_STORES]
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = ast.unparse(node.value)
                if owner.endswith("store") or owner.endswith("zarr"):
                    found.append(f"{path.name}:{node.lineno} {owner}.{node.attr}")
    assert not found, found


def test_lease_safety_s3_probe(s3_endpoint: S3Endpoint) -> None:
    s3 = s3_endpoint
    on_s3 = Storage.open(s3.url(_unique("safety")), storage_options=s3.storage_options, mode="w")
    assert on_s3.lease_safety == "atomic"  # moto honours If-None-Match and If-Match
    assert on_s3._s3_conditional == (True, True)
    assert on_s3.list_prefix("") == []

    async def every_key() -> list[str]:
        return [k async for k in on_s3.store.list_prefix("")]

    assert sync(every_key()) == []  # the probe object is gone (zarr's own listing hides nothing)


def _fallback_storages(s3: S3Endpoint) -> list[Storage]:
    """S3 as if the endpoint lacked conditional DELETE (leases release by tombstone), and as if it
    ignored every condition (best effort): the contract must hold sequentially in both."""
    out = []
    for caps in ((True, False), (False, False)):
        storage = Storage.open(s3.url(_unique("fallback")), storage_options=s3.storage_options, mode="w")
        storage._s3_conditional = caps
        out.append(storage)
    return out


def test_s3_fallbacks_keep_the_contract(s3_endpoint: S3Endpoint) -> None:
    tombstone, best_effort = _fallback_storages(s3_endpoint)
    assert tombstone.lease_safety == "atomic" and best_effort.lease_safety == "best-effort"
    for storage in (tombstone, best_effort):
        clock = Clock()
        storage.clock = clock
        assert storage.create_exclusive("x", b"1") and not storage.create_exclusive("x", b"2")
        assert storage.read_bytes("x") == b"1"
        assert acquire_lease(storage, "l", "a", ttl_s=5)
        assert not acquire_lease(storage, "l", "b", ttl_s=5)
        assert release_lease(storage, "l", "a")
        assert read_lease(storage, "l") is None
        assert acquire_lease(storage, "l", "b", ttl_s=5)
        clock.now += 6
        assert acquire_lease(storage, "l", "c", ttl_s=5)
        assert not renew_lease(storage, "l", "b", ttl_s=5)
        assert read_lease(storage, "l")["owner"] == "c"  # type: ignore[index]
    # With conditional PUT but no conditional DELETE, the release left a tombstone behind.
    assert tombstone.read_bytes("selkd/leases/l.json") is not None


def test_s3_sees_objects_written_by_other_clients(s3_endpoint: S3Endpoint) -> None:
    """Two separate s3fs clients (two workers): each must see the other's new objects at once, i.e.
    s3fs's listings cache must be off (it would hide them for the life of the client)."""
    s3 = s3_endpoint
    url = s3.url(_unique("shared"))
    options = {**s3.storage_options, "skip_instance_cache": True}
    a = Storage.open(url, storage_options=options, mode="w")
    b = Storage.open(url, storage_options=options, mode="w")
    a.write_bytes("selkd/commits/p-0.json", b"{}")
    assert a.list_dir("selkd/commits") == ["p-0.json"]  # a has now listed the directory
    b.write_bytes("selkd/commits/p-1.json", b"{}")
    assert a.exists("selkd/commits/p-1.json")
    assert a.list_dir("selkd/commits") == ["p-0.json", "p-1.json"]
    b.delete("selkd/commits/p-0.json")
    assert not a.exists("selkd/commits/p-0.json")


def test_s3_other_workers_probes_are_not_contents(s3_endpoint: S3Endpoint) -> None:
    """Workers opening one empty store together: each writes a short-lived probe object (conditional
    writes), which the others' listings must not show (a builder would take the store for foreign
    contents; seen as tests/test_recipe.py's 2-rank build failing with "holds files that are not a
    selkd cache")."""
    s3 = s3_endpoint
    url = s3.url(_unique("probes"))
    watcher = Storage.open(url, storage_options=s3.storage_options, mode="w")

    def open_several() -> None:
        for _ in range(4):
            Storage.open(url, storage_options=s3.storage_options, mode="w")

    openers = [threading.Thread(target=open_several) for _ in range(2)]
    for t in openers:
        t.start()
    seen: set[str] = set()
    while any(t.is_alive() for t in openers):
        seen.update(watcher.list_dir(""), watcher.list_prefix(""))
        if not watcher.is_empty():
            seen.add("is_empty() False")
    for t in openers:
        t.join()
    assert seen == set()


def test_s3_env_endpoint_is_used(aws_env: S3Endpoint) -> None:
    """Only the standard AWS variables: Storage finds the endpoint and credentials from them."""
    storage = Storage.open(aws_env.url(_unique("envcheck")), mode="w")
    assert storage.fs.endpoint_url == aws_env.endpoint_url
    storage.write_bytes("k", b"v")
    assert storage.read_bytes("k") == b"v"


@pytest.mark.parametrize("kind", ["fsspec-memory", "s3-options", "s3-env"])
def test_url_open_read_mode(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    writable = open_backend(kind, request, tmp_path)
    options = request.getfixturevalue("s3_endpoint").storage_options if kind == "s3-options" else None
    with pytest.raises(StoreError, match="no cache there"):
        Storage.open(writable.url, storage_options=options, mode="r")
    zarr.create_group(writable.store)
    write_array(writable, "x", np.arange(10, dtype=np.int64))
    reader = Storage.open(writable.url, storage_options=options, mode="r")
    np.testing.assert_array_equal(reader.open_array("x")[3:6], [3, 4, 5])
    with pytest.raises(StoreError, match="read-only"):
        reader.create_exclusive("y", b"1")
    with pytest.raises(StoreError, match="read-only"):
        acquire_lease(reader, "l", "w", ttl_s=1)


# --- errors -------------------------------------------------------------------------------------


def test_error_missing_local_path_read_mode(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such cache directory"):
        Storage.open(tmp_path / "nope", mode="r")


def test_error_file_where_directory_expected(tmp_path: Path) -> None:
    path = tmp_path / "a-file"
    path.write_text("x")
    with pytest.raises(StoreError, match="is a file, not a cache directory"):
        Storage.open(path, mode="r")
    with pytest.raises(StoreError, match="exists and is a file"):
        Storage.open(path, mode="w")
    with pytest.raises(StoreError, match="cannot create the cache directory"):
        Storage.open(path / "below", mode="w")


def test_error_storage_options_for_local_path(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="only applies to URLs"):
        Storage.open(tmp_path, storage_options={"key": "x"}, mode="w")


def test_error_unknown_protocol() -> None:
    with pytest.raises(StoreError, match=r"unknown URL scheme 'nosuchfs://'"):
        Storage.open("nosuchfs://bucket/prefix", mode="w")
    with pytest.raises(StoreError, match=r"Storage\.memory\(\)"):
        Storage.open("memory-store://x", mode="w")


def test_error_missing_bucket(s3_endpoint: S3Endpoint) -> None:
    for mode in ("r", "w"):
        with pytest.raises(StoreError, match=r"bucket 'selkd-no-such-bucket' does not exist at http://127"):
            Storage.open("s3://selkd-no-such-bucket/cache", storage_options=s3_endpoint.storage_options, mode=mode)


def test_error_missing_bucket_env(aws_env: S3Endpoint) -> None:
    with pytest.raises(StoreError, match="bucket 'selkd-no-such-bucket' does not exist"):
        Storage.open("s3://selkd-no-such-bucket/cache", mode="w")


def test_error_no_credentials(aws_env: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no 1 s wait for an instance role
    with pytest.raises(StoreError, match="Unable to locate credentials.*AWS_ACCESS_KEY_ID"):
        Storage.open(aws_env.url("x"), storage_options={"skip_instance_cache": True}, mode="w")


@pytest.mark.parametrize("mode", ["r", "w"])
def test_error_rejected_or_denied_credentials(s3_auth: AuthS3Endpoint, mode: str) -> None:
    """IAM authentication on: wrong keys are told from keys a policy denies, at open, in one StoreError."""
    url = s3_auth.url(_unique("creds"))
    Storage.open(url, storage_options=s3_auth.options("writer"), mode="w").write_json("zarr.json", {})
    for options, expected in [
        (s3_auth.options("writer", secret="wrong"), r"rejected the credentials \(SignatureDoesNotMatch: .*AWS_PROFILE"),
        (s3_auth.options("writer", key="AKIASELKDUNKNOWN0000"), r"rejected the credentials \(InvalidAccessKeyId: "),
        (s3_auth.options("nobody"), r"access denied reading zarr.json at http://\S+ \(AccessDenied: .*bucket policy"),
    ]:
        with pytest.raises(StoreError, match=rf"^{re.escape(url)}: .*{expected}"):
            Storage.open(url, storage_options=options, mode=mode)
    assert Storage.open(url, storage_options=s3_auth.options("reader"), mode="r").read_json("zarr.json") == {}
    with pytest.raises(StoreError, match=r"access denied writing a probe object .*\(AccessDenied: "):
        Storage.open(url, storage_options=s3_auth.options("reader"), mode="w")


@pytest.mark.parametrize(
    "url, options",
    [
        ("hf://datasets/selkd/cache", {"endpoint": "http://127.0.0.1:1"}),  # HfFileSystem, connection refused
        ("hf://datasets/selkd/cache", {"endpoint": "https://selkd.invalid"}),  # a name that never resolves
        ("https://selkd.invalid/cache", None),
        ("http://127.0.0.1:1/cache", None),
    ],
)
def test_error_unreachable_url(url: str, options: dict[str, str] | None) -> None:
    for mode in ("r", "w"):
        start = time.monotonic()
        with pytest.raises(
            StoreError, match=rf"^{re.escape(url)}: cannot reach the server.*check the URL and the network"
        ):
            Storage.open(url, storage_options=options, mode=mode)
        assert time.monotonic() - start < 10


def test_error_read_only_local(tmp_path: Path) -> None:
    Storage.open(tmp_path, mode="w").write_json("zarr.json", {})
    reader = Storage.open(tmp_path, mode="r")
    for call in (
        lambda: reader.create_exclusive("a", b"1"),
        lambda: acquire_lease(reader, "l", "w", ttl_s=1),
        lambda: renew_lease(reader, "l", "w", ttl_s=1),
        lambda: release_lease(reader, "l", "w"),
    ):
        with pytest.raises(StoreError, match="read-only"):
            call()
    assert not (tmp_path / "a").exists()


# --- local leases between processes -------------------------------------------------------------


def _take_over(root: str, name: str, owner: str, now: float, barrier: threading.Barrier, out: object) -> None:
    storage = Storage.open(root, mode="w")
    storage.clock = lambda: now
    barrier.wait()
    out.put((owner, acquire_lease(storage, name, owner, ttl_s=30)))  # type: ignore[attr-defined]


def test_local_lease_takeover_between_processes(tmp_path: Path) -> None:
    """flock (not just the thread lock) serialises takeovers: processes racing for an expired lease."""
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork")
    ctx = multiprocessing.get_context("fork")
    storage = Storage.open(tmp_path, mode="w")
    storage.clock = lambda: 100.0
    for round_ in range(2):
        name = f"race-{round_}"
        assert acquire_lease(storage, name, "dead-worker", ttl_s=1)
        n = 4
        barrier, out = ctx.Barrier(n), ctx.Queue()
        procs = [
            ctx.Process(target=_take_over, args=(str(tmp_path), name, f"p{i}", 200.0, barrier, out)) for i in range(n)
        ]
        for p in procs:
            p.start()
        results = dict(out.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        winners = [owner for owner, won in results.items() if won]
        assert len(winners) == 1, results
        record = json.loads((tmp_path / f"selkd/leases/{name}.json").read_bytes())
        assert record["owner"] == winners[0]

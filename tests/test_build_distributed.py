"""Many builders on one store: torchrun ranks, and builders that would write the same part.

- ``torchrun --nproc-per-node 2 -m selkd.cache build`` on CPU gives the cache a one-process build
  gives, part for part (commit-record checksums), and ``verify`` passes;
- two builders launched with the same rank never both write a part: a lease per part in the store
  (owner host:pid:pidspace:uuid, a TTL, renewed between batches and right before the commit);
- a part another live builder holds is left to it (and picked up if it commits it), a lapsed lease
  is taken over, a dead builder's lease on this host is taken over at once, and a builder that lost
  its lease never writes the commit record.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import faults  # tools/faults.py
import pytest

from selkd.cache import build as build_module
from selkd.cache import format as fmt
from selkd.cache import open_cache
from selkd.cache.build import build_cache
from selkd.cache.cli import main as cache_main
from selkd.cache.config import BuildConfig
from selkd.cache.errors import BuildError
from selkd.cache.leases import PartLeases, _pid_space, acquire_lease, read_lease, release_lease
from selkd.cache.store import Storage

pytestmark = pytest.mark.slow

OPTIONS: dict[str, Any] = dict(
    classes="sample:16",
    max_seq_len=64,
    limit_tokens=3000,
    part_tokens=512,
    eval_fraction=0.1,
    batch_size=4,
    sample_ratio=0.75,
    sample_signal="random",
    device="cpu",
    progress=False,
)


def cfg(teacher: Path, data: Path, out: Path, **kw: Any) -> BuildConfig:
    return BuildConfig(teacher=str(teacher), data=[str(data)], out=str(out), **{**OPTIONS, **kw})


def argv(teacher: Path, data: Path, out: Path) -> list[str]:
    flags = []
    for key, value in OPTIONS.items():
        flags += [f"--{key.replace('_', '-')}", str(value).lower() if isinstance(value, bool) else str(value)]
    return ["build", "--teacher", str(teacher), "--data", str(data), "--out", str(out), *flags]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, text_corpus_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("distributed_reference") / "cache"
    result = build_cache(cfg(tiny_teacher_dir, text_corpus_dir, out))
    assert result.finalized and result.parts_written >= 5
    return out


def test_torchrun_two_processes_equal_one(
    reference: Path, tiny_teacher_dir: Path, text_corpus_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "selkd.cache", *argv(tiny_teacher_dir, text_corpus_dir, out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert cache_main(["verify", str(out)]) == 0
    assert faults.cache_digest(out) == faults.cache_digest(reference)
    reader = open_cache(str(out))
    assert reader.summary is not None and not reader.missing_parts
    # two builders, each writing its own parts (p % 2 == rank), together all of them
    written = [int(n) for n in re.findall(r"done in [0-9.]+ s: (\d+) parts written", proc.stderr)]
    assert len(written) == 2 and sum(written) == len(reader.parts) and min(written) > 0, proc.stderr[-4000:]


def test_two_builders_with_the_same_rank_never_write_the_same_part(
    reference: Path, tiny_teacher_dir: Path, text_corpus_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cache"
    trace = tmp_path / "commits.txt"
    # Both builders are rank 0 of 1; slowed down (0.2 s per batch) so that they really overlap.
    procs = [
        faults.start_child(
            "cache", argv(tiny_teacher_dir, text_corpus_dir, out), log=tmp_path / f"b{i}.log", trace=trace, delay_s=0.2
        )
        for i in range(2)
    ]
    codes = [faults.wait_child(p, timeout_s=300) for p in procs]
    logs = "\n".join((tmp_path / f"b{i}.log").read_text() for i in range(2))
    assert codes == [0, 0], logs
    commits = Counter(line.split()[0] for line in trace.read_text().splitlines())
    assert commits and max(commits.values()) == 1, f"a part was committed twice: {commits}\n{logs}"
    assert {k.rsplit("/", 1)[1].removesuffix(".json") for k in commits} == set(faults.cache_digest(reference))
    assert faults.cache_digest(out) == faults.cache_digest(reference)
    assert cache_main(["verify", str(out)]) == 0


def test_a_builder_that_looked_before_another_created_the_cache_joins_or_refuses_it(
    reference: Path, tiny_teacher_dir: Path, text_corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two builds of one new --out: the second looked while it was empty, the first then wrote the
    root. The second must not overwrite the first's header: with other settings it stops, with the
    same ones it joins (here: finds every part committed)."""
    out = tmp_path / "cache"
    shutil.copytree(reference, out)  # what the first builder has written by now
    root = (out / "zarr.json").read_bytes()
    real_open_output = build_module.open_output
    monkeypatch.setattr(build_module, "open_output", lambda c: (real_open_output(c)[0], None))  # its first look
    with pytest.raises(BuildError, match=r"(?s)built with other settings.*sample selection"):
        build_cache(cfg(tiny_teacher_dir, text_corpus_dir, out, sample_ratio=0.5))
    assert (out / "zarr.json").read_bytes() == root
    result = build_cache(cfg(tiny_teacher_dir, text_corpus_dir, out))
    assert result.finalized and result.parts_written == 0
    assert faults.cache_digest(out) == faults.cache_digest(reference)


# --- leases, deterministically: one builder, and a second owner played by the test ---------------------


def _remove_parts(cache: Path, *parts: str) -> None:
    for part in parts:
        (cache / fmt.COMMITS_PREFIX / f"{part}.json").unlink()
        shutil.rmtree(cache / fmt.PARTS_GROUP / part)


def _restore_part(reference: Path, cache: Path, part: str) -> None:
    """Do what another builder holding ``part`` would do: write its arrays, then its commit record."""
    shutil.copytree(reference / fmt.PARTS_GROUP / part, cache / fmt.PARTS_GROUP / part, dirs_exist_ok=True)
    shutil.copy(reference / fmt.COMMITS_PREFIX / f"{part}.json", cache / fmt.COMMITS_PREFIX / f"{part}.json")


def _copy(reference: Path, tmp_path: Path, *removed: str) -> Path:
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    _remove_parts(out, *removed)
    return out


OTHER_HOST = "elsewhere:4242:0123456789ab:" + uuid.uuid4().hex


def test_part_held_by_a_live_builder_is_left_to_it(
    reference: Path,
    tiny_teacher_dir: Path,
    text_corpus_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = _copy(reference, tmp_path, "part-00002", "part-00004")
    storage = Storage.open(str(out), mode="w")
    name = PartLeases.lease_name("part-00002")
    assert acquire_lease(storage, name, OTHER_HOST, 600)

    def other_builder() -> None:  # commits part-00002 once our builder is done with part-00004, then lets go
        deadline = time.monotonic() + 120
        while not (out / fmt.COMMITS_PREFIX / "part-00004.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        _restore_part(reference, out, "part-00002")
        release_lease(storage, name, OTHER_HOST)

    thread = threading.Thread(target=other_builder)
    thread.start()
    result = build_cache(cfg(tiny_teacher_dir, text_corpus_dir, out))
    thread.join()
    err = capsys.readouterr().err
    assert "part-00002: held by another builder (elsewhere:4242" in err
    assert result.parts_written == 1 and result.finalized  # only part-00004: part-00002 was the other's
    assert faults.cache_digest(out) == faults.cache_digest(reference)


def test_lapsed_lease_is_taken_over(
    reference: Path,
    tiny_teacher_dir: Path,
    text_corpus_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = _copy(reference, tmp_path, "part-00002")
    storage = Storage.open(str(out), mode="w")
    # The holder stops renewing. Its lease must still run when the builder reaches the part (after loading
    # the models: seconds on a busy machine), so not too short; the builder then waits for it to lapse.
    assert acquire_lease(storage, PartLeases.lease_name("part-00002"), OTHER_HOST, 12.0)
    result = build_cache(cfg(tiny_teacher_dir, text_corpus_dir, out))
    assert "part-00002: held by another builder" in capsys.readouterr().err
    assert result.parts_written == 1 and result.finalized
    assert faults.cache_digest(out) == faults.cache_digest(reference)


def test_dead_builder_on_this_host_is_taken_over_at_once(
    reference: Path,
    tiny_teacher_dir: Path,
    text_corpus_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = _copy(reference, tmp_path, "part-00002")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # exited and reaped: its pid names no process
    owner = f"{socket.gethostname()}:{dead.pid}:{_pid_space()}:{uuid.uuid4().hex}"
    storage = Storage.open(str(out), mode="w")
    assert acquire_lease(storage, PartLeases.lease_name("part-00002"), owner, 600)
    start = time.monotonic()
    result = build_cache(cfg(tiny_teacher_dir, text_corpus_dir, out))
    assert time.monotonic() - start < 120  # not the 600 s of the dead builder's lease
    assert f"(pid {dead.pid} on this host) has exited; taking the part over" in capsys.readouterr().err
    assert result.parts_written == 1
    assert faults.cache_digest(out) == faults.cache_digest(reference)
    # a live process on this host keeps its lease
    me = f"{socket.gethostname()}:{os.getpid()}:{_pid_space()}:x"
    from selkd.cache.leases import holder_is_dead

    assert not holder_is_dead(me) and holder_is_dead(owner)
    assert not holder_is_dead(f"{socket.gethostname()}:{dead.pid}:another-space:x")  # other container: unknown


@pytest.mark.parametrize("when", ["mid-part", "mid-write"])
def test_builder_that_lost_its_lease_does_not_commit(
    when: str,
    reference: Path,
    tiny_teacher_dir: Path,
    text_corpus_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another builder takes part-00002 over while ours still works on it (ours stalled past its TTL):
    during the teacher pass, or between the array writes and the commit record. Ours must not commit
    it; the part is committed once, by ours again after the thief's lease lapses."""
    from selkd.cache import writer
    from selkd.cache.writer import PartWriter

    out = _copy(reference, tmp_path, "part-00002", "part-00003")
    name = PartLeases.lease_name("part-00002")
    stolen = {"done": False}
    commit_writes: list[float] = []

    def steal(storage: Storage) -> None:
        if not stolen["done"]:
            stolen["done"] = True
            holder = read_lease(storage, name)
            assert holder is not None
            assert release_lease(storage, name, holder["owner"])  # as if it had lapsed and been taken
            assert acquire_lease(storage, name, OTHER_HOST, 2.0)
            stolen["at"] = time.monotonic()

    if when == "mid-part":
        original_add = PartWriter.add

        def add(self: PartWriter, *args: Any, **kwargs: Any) -> None:
            if self.name == "part-00002":
                steal(self.storage)
            original_add(self, *args, **kwargs)

        monkeypatch.setattr(PartWriter, "add", add)
    else:
        original_write = writer.write_array

        def write_array(storage: Storage, path: str, values: Any) -> None:
            original_write(storage, path, values)
            if path.startswith(f"{fmt.PARTS_GROUP}/part-00002/"):
                steal(storage)

        monkeypatch.setattr(writer, "write_array", write_array)

    original_json = Storage.write_json

    def write_json(self: Storage, key: str, obj: Any) -> None:
        if key == f"{fmt.COMMITS_PREFIX}/part-00002.json":
            commit_writes.append(time.monotonic())
        original_json(self, key, obj)

    monkeypatch.setattr(Storage, "write_json", write_json)
    result = build_cache(cfg(tiny_teacher_dir, text_corpus_dir, out))
    err = capsys.readouterr().err
    assert stolen["done"] and "part-00002: lost the lease on this part to another builder" in err
    assert len(commit_writes) == 1 and commit_writes[0] > stolen["at"] + 2.0  # only after the thief's TTL
    assert result.parts_written == 2 and result.finalized
    assert faults.cache_digest(out) == faults.cache_digest(reference)


def test_each_torchrun_rank_uses_its_local_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--device auto/cuda under torchrun: rank r of a node loads its teacher onto cuda:LOCAL_RANK, not cuda:0."""
    import torch

    from selkd.cache.build import builder_device
    from selkd.cache.options import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    base = dict(teacher="t", data=["d"], out=str(tmp_path))
    assert builder_device(BuildConfig(**base, device="auto")) == torch.device("cuda", 2)
    assert builder_device(BuildConfig(**base, device="cpu")) == torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK")
    assert builder_device(BuildConfig(**base, device="auto")) == torch.device("cuda")
    with pytest.raises(ConfigError, match="--lease-ttl must be >= 5.0"):
        BuildConfig(**base, lease_ttl=1)

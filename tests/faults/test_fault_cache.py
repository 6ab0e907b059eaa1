"""Damaged and incomplete caches, and a full disk: what the reader, info, verify and training do.

- a flipped byte in a chunk: the reader (whole-part reads, random access) and ``verify`` name the part
  and the array;
- a flipped byte in a chunk of a version-2 cache, whether the chunk still decodes or not: every read
  fails its crc32c, and training stops with one line naming the part and the array (exit 1); a
  version-1 cache (no per-chunk checksum) still trains and verifies;
- a deleted part (its commit record, its arrays, or one array): ``info`` shows it as missing,
  training refuses unless ``--allow-missing-parts`` (then it warns at every epoch), ``verify`` names
  a missing array;
- ENOSPC while writing: one line naming the store and what to do, exit 1; the rerun completes and
  equals an uninterrupted build.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faults  # tools/faults.py
import numcodecs
import numpy as np
import pytest
from bench_storage import drop_chunk_checksums  # tools/bench_storage.py
from zarr.storage import LocalStore

from selkd.cache import CacheCorruptError, CacheError, open_cache
from selkd.cache import format as fmt
from selkd.cache.cli import main as cache_main
from selkd.trainer.cli import main as train_main


def run(main: Callable[[list[str]], int], args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def copy_of(reference: Path, tmp_path: Path) -> Path:
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    return out


def flip(path: Path, at: int, mask: int = 0x40) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= mask
    path.write_bytes(bytes(data))


def blosc_frame(array_dir: Path) -> tuple[int, int]:
    """(offset, length) in its shard of the Blosc frame of an array's only inner chunk: the shard ends
    with an index of (offset, length) uint64 pairs and the index's crc32c; in format version 2 the
    chunk's last 4 bytes are its crc32c."""
    meta = json.loads((array_dir / "zarr.json").read_text())
    sharding = meta["codecs"][0]["configuration"]
    assert meta["shape"] == sharding["chunk_shape"], "expected one inner chunk"
    offset, length = np.frombuffer((array_dir / "c" / "0").read_bytes()[-20:-4], "<u8")
    crc = 4 if sharding["codecs"][-1]["name"] == "crc32c" else 0
    return int(offset), int(length) - crc


def flip_that_still_decodes(array_dir: Path) -> int:
    """The shard offset of the first byte after the 16-byte Blosc header whose flip (bit 0) still
    decodes, to other values: what a reader without per-chunk checksums returns as data."""
    offset, length = blosc_frame(array_dir)
    frame = (array_dir / "c" / "0").read_bytes()[offset : offset + length]
    blosc = numcodecs.Blosc()
    want = bytes(blosc.decode(frame))
    for at in range(16, len(frame)):
        bad = bytearray(frame)
        bad[at] ^= 0x01
        try:
            got = bytes(blosc.decode(bytes(bad)))
        except Exception:
            continue
        if len(got) == len(want) and got != want:
            return offset + at
    raise AssertionError(f"{array_dir}: no single-bit flip of its chunk still decodes")


def break_blosc_header(array_dir: Path) -> None:
    """Make the chunk undecodable: flip its Blosc header's size fields."""
    offset, length = blosc_frame(array_dir)
    for k in (4, 5, 6):
        flip(array_dir / "c" / "0", offset + k, 0xFF)
    with pytest.raises(Exception):  # noqa: B017 (whatever Blosc raises)
        numcodecs.Blosc().decode((array_dir / "c" / "0").read_bytes()[offset : offset + length])


def set_format_version(cache: Path, version: int) -> None:
    root = json.loads((cache / "zarr.json").read_text())
    root["attributes"][fmt.ROOT_ATTR]["format_version"] = version
    (cache / "zarr.json").write_text(json.dumps(root))


def first_index(reader: Any, part: str) -> tuple[int, str]:
    """(index within its split, split) of a part's first sequence, for ``reader.get``."""
    rec = next(p for p in reader.parts if p.name == part)
    before = [p for p in reader.split_parts(rec.split) if p.name < part]
    return sum(p.n_sequences for p in before), rec.split


def test_flipped_byte_reader_names_part_and_array(
    reference_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy_of(reference_cache, tmp_path)
    shard = out / fmt.PARTS_GROUP / "part-00002" / "teacher_entropy" / "c" / "0"
    flip(shard, len(shard.read_bytes()) // 3)
    reader = open_cache(str(out))
    with pytest.raises(CacheCorruptError, match=r"part part-00002, array teacher_entropy: checksum mismatch") as err:
        reader.read_part("part-00002")  # the chunk's crc32c (format version 2) finds it before the sha256
    assert (err.value.part, err.value.array) == ("part-00002", "teacher_entropy")
    split = next(p.split for p in reader.parts if p.name == "part-00002")
    with pytest.raises(CacheCorruptError, match="part-00002.*teacher_entropy"):
        list(reader.iter_sequences(split))
    code, _, stderr = run(cache_main, ["verify", str(out)], capsys)
    assert code == 1 and "part part-00002, array teacher_entropy" in stderr

    # Random access reads a slice, which whole-array checksums cannot cover; the chunk's crc32c does.
    ids = out / fmt.PARTS_GROUP / "part-00003" / "input_ids"
    break_blosc_header(ids)
    i, split = first_index(reader, "part-00003")
    with pytest.raises(CacheCorruptError, match=r"part part-00003, array input_ids: checksum mismatch in a stored"):
        open_cache(str(out)).get(i, split)


CRC_LINE = "array class_counts: checksum mismatch in a stored chunk (crc32c)"


def test_flip_that_still_decodes_fails_every_read(
    reference_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy_of(reference_cache, tmp_path)
    reader = open_cache(str(out))
    assert reader.format_version == 2 and reader.chunk_checksums
    part = reader.split_parts("train")[1]
    counts = out / fmt.PARTS_GROUP / part.name / "class_counts"
    flip(counts / "c" / "0", flip_that_still_decodes(counts), 0x01)
    i, split = first_index(reader, part.name)
    reads: list[Callable[[], Any]] = [
        lambda: reader.get(i, split),
        lambda: reader.read_range(part, 0, 2),
        lambda: reader.read_part(part),
    ]
    for read in reads:
        with pytest.raises(CacheCorruptError, match=rf"part {part.name}, {re.escape(CRC_LINE)}") as err:
            read()
        assert (err.value.part, err.value.array) == (part.name, "class_counts")
    code, _, stderr = run(cache_main, ["verify", str(out)], capsys)
    assert code == 1 and f"part {part.name}, {CRC_LINE}" in stderr


@pytest.mark.parametrize(
    ("damage", "workers"),
    [("still-decodes", "0"), ("still-decodes", "1"), ("does-not-decode", "0"), ("does-not-decode", "1")],
)
def test_corrupt_chunk_stops_training_with_one_line(
    damage: str,
    workers: str,
    reference_cache: Path,
    tiny_student_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Training streams unit slices, never a whole array: the chunk's crc32c is what catches a flip,
    in the training process (--num-workers 0) and in a DataLoader worker process alike."""
    out = copy_of(reference_cache, tmp_path)
    part = open_cache(str(out)).split_parts("train")[1].name
    counts = out / fmt.PARTS_GROUP / part / "class_counts"
    if damage == "still-decodes":
        flip(counts / "c" / "0", flip_that_still_decodes(counts), 0x01)
    else:
        break_blosc_header(counts)
    run_dir = tmp_path / "run"
    code, _, stderr = run(train_main, _train_argv(out, tiny_student_dir, run_dir, "--num-workers", workers), capsys)
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert code == 1 and "Traceback" not in stderr, stderr
    assert len(errors) == 1 and errors[0].startswith("selkd-train: error: "), stderr
    assert f"part {part}, {CRC_LINE}" in errors[0] and f"delete selkd/commits/{part}.json" in errors[0]
    assert not (run_dir / "final").exists()


def test_version_1_cache_trains_and_verifies(
    reference_cache: Path, tiny_student_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy_of(reference_cache, tmp_path)
    drop_chunk_checksums(out)  # the arrays as the version-1 writer wrote them, the header says version 1
    reader = open_cache(str(out))
    assert reader.format_version == 1 and not reader.chunk_checksums
    code, stdout, _ = run(cache_main, ["info", str(out)], capsys)
    assert code == 0 and "selkd-cache v1" in stdout
    assert run(cache_main, ["verify", str(out)], capsys)[0] == 0
    for cache, run_dir in ((out, tmp_path / "v1"), (reference_cache, tmp_path / "v2")):
        code, _, stderr = run(train_main, _train_argv(cache, tiny_student_dir, run_dir, "--num-workers", "0"), capsys)
        assert code == 0, stderr
    assert faults.train_losses(tmp_path / "v1") == faults.train_losses(tmp_path / "v2")  # the same values

    # Without the per-chunk checksum a flip that still decodes is found by the whole-array sha256 only.
    part = reader.split_parts("train")[1]
    counts = out / fmt.PARTS_GROUP / part.name / "class_counts"
    flip(counts / "c" / "0", flip_that_still_decodes(counts), 0x01)
    assert open_cache(str(out)).read_range(part, 0, part.n_sequences) is not None  # no check on slices in v1
    code, _, stderr = run(cache_main, ["verify", str(out)], capsys)
    assert code == 1 and f"part {part.name}, array class_counts: checksum mismatch" in stderr
    # A chunk that no longer decompresses still stops training with one line naming part and array.
    break_blosc_header(out / fmt.PARTS_GROUP / part.name / "input_ids")
    code, _, stderr = run(train_main, _train_argv(out, tiny_student_dir, tmp_path / "broken"), capsys)
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert code == 1 and "Traceback" not in stderr and len(errors) == 1, stderr
    assert f"part {part.name}, array input_ids: cannot be read" in errors[0]

    # The same arrays under a version-2 header lack what version 2 promises: refused before decoding.
    set_format_version(out, 2)
    with pytest.raises(CacheCorruptError, match=r"part part-00001, array \w+: its chunks carry no crc32c"):
        open_cache(str(out)).get(0)


def _train_argv(cache: Path, student: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--cache",
        str(cache),
        "--student",
        str(student),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--eval-every",
        "0",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--progress",
        "false",
        *extra,
    ]


def test_deleted_commit_record_info_and_training(
    reference_cache: Path, tiny_student_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy_of(reference_cache, tmp_path)
    (out / fmt.COMMITS_PREFIX / "part-00003.json").unlink()

    code, stdout, _ = run(cache_main, ["info", str(out), "--json"], capsys)
    info = json.loads(stdout)
    assert code == 0 and info["parts_incomplete"] == 1 and info["missing_parts"] == ["part-00003"]
    code, stdout, _ = run(cache_main, ["info", str(out)], capsys)
    assert "1 incomplete" in stdout and "not committed: part-00003" in stdout
    code, _, stderr = run(cache_main, ["verify", str(out)], capsys)  # what is committed is intact
    assert code == 0 and "part-00003" in stderr

    code, _, stderr = run(train_main, _train_argv(out, tiny_student_dir, tmp_path / "refused"), capsys)
    assert code == 1 and "incomplete cache" in stderr and "part-00003" in stderr

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, stderr = run(
            train_main, _train_argv(out, tiny_student_dir, tmp_path / "allowed", "--allow-missing-parts"), capsys
        )
    assert code == 0, stderr
    missing = [str(w.message) for w in caught if "parts of the cache are missing" in str(w.message)]
    for epoch in (0, 1):  # a warning at every epoch, naming how many parts are missing
        assert any(f"epoch {epoch}: 1 of" in m for m in missing), missing


def test_deleted_part_arrays_count_as_missing(
    reference_cache: Path, tiny_student_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy_of(reference_cache, tmp_path)
    shutil.rmtree(out / fmt.PARTS_GROUP / "part-00003")  # the commit record stays

    reader = open_cache(str(out), require_complete=False)
    assert reader.missing_parts == ["part-00003"] and reader.lost_parts == ["part-00003"]
    assert "part-00003" not in {p.name for p in reader.parts}
    code, stdout, _ = run(cache_main, ["info", str(out)], capsys)
    assert code == 0 and "1 incomplete" in stdout and "have no arrays (deleted?): part-00003" in stdout
    with pytest.raises(CacheError, match="incomplete cache.*part-00003.*arrays are gone"):
        open_cache(str(out))
    code, _, stderr = run(train_main, _train_argv(out, tiny_student_dir, tmp_path / "refused"), capsys)
    assert code == 1 and "incomplete cache" in stderr


def test_deleted_array_named_by_verify_and_reader(
    reference_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy_of(reference_cache, tmp_path)
    shutil.rmtree(out / fmt.PARTS_GROUP / "part-00004" / "class_counts")
    code, _, stderr = run(cache_main, ["verify", str(out)], capsys)
    assert code == 1 and "part part-00004, array class_counts: cannot be read" in stderr
    with pytest.raises(CacheCorruptError, match="part part-00004, array class_counts"):
        open_cache(str(out)).read_part("part-00004")


def test_disk_full_one_line_then_rerun_completes(
    build_argv: Callable[..., list[str]],
    reference_cache: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "cache"
    original = LocalStore.set
    full = {"on": False}

    async def set_until_full(self: LocalStore, key: str, value: Any) -> None:
        # The disk fills up while part-00002's arrays are written, and stays full.
        full["on"] = full["on"] or key.startswith(f"{fmt.PARTS_GROUP}/part-00002/")
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(str(self.root)) / key))
        await original(self, key, value)

    monkeypatch.setattr(LocalStore, "set", set_until_full)
    code, _, stderr = run(cache_main, build_argv(out), capsys)
    assert code == 1
    errors = [line for line in stderr.splitlines() if line.startswith("selkd-cache: error")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert str(out) in errors[0] and "no space left" in errors[0]
    assert "free space" in errors[0] and "rerun the same command" in errors[0]
    partial = open_cache(str(out), require_complete=False)  # the part being written is not visible
    assert "part-00002" not in {p.name for p in partial.parts} and "part-00001" in {p.name for p in partial.parts}

    monkeypatch.setattr(LocalStore, "set", original)
    code, _, stderr = run(cache_main, build_argv(out), capsys)
    assert code == 0, stderr
    assert cache_main(["verify", str(out)]) == 0
    assert faults.cache_digest(out) == faults.cache_digest(reference_cache)


def test_disk_quota_message() -> None:
    from selkd.cache.errors import disk_full_error, disk_full_message

    err = OSError(errno.EDQUOT, "Disk quota exceeded", "/data/c/parts/part-00001/x/c/0")
    wrapped = RuntimeError("write failed")
    wrapped.__cause__ = err
    assert disk_full_error(wrapped) is err
    assert disk_full_error(RuntimeError("other")) is None
    message = disk_full_message("/data/c", err, "what a rerun does")
    assert "\n" not in message and "/data/c" in message and "quota" in message and "rerun" in message
    # safetensors (Rust) names the errno only in its message, in its own exception type
    rust = disk_full_error(ValueError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert rust is not None and rust.errno == errno.ENOSPC


def test_version_1_build_finished_by_this_selkd_stays_version_1(
    reference_cache: Path, build_argv: Callable[..., list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The header is the build's: a v1 build rerun to finish it stays v1; the part it adds has crc32c."""
    out = copy_of(reference_cache, tmp_path)
    drop_chunk_checksums(out)
    (out / fmt.COMMITS_PREFIX / "part-00003.json").unlink()
    shutil.rmtree(out / fmt.PARTS_GROUP / "part-00003")
    code, _, stderr = run(cache_main, build_argv(out), capsys)
    assert code == 0, stderr
    assert open_cache(str(out)).format_version == 1
    for part, last in (("part-00002", "blosc"), ("part-00003", "crc32c")):
        meta = json.loads((out / fmt.PARTS_GROUP / part / "input_ids" / "zarr.json").read_text())
        assert meta["codecs"][0]["configuration"]["codecs"][-1]["name"] == last
    assert run(cache_main, ["verify", str(out)], capsys)[0] == 0

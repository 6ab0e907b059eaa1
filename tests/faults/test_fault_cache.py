"""Damaged and incomplete caches, and a full disk: what the reader, info, verify and training do.

- a flipped byte in a chunk: the reader (whole-part reads, random access) and ``verify`` name the part
  and the array;
- a deleted part (its commit record, its arrays, or one array): ``info`` shows it as missing,
  training refuses unless ``--allow-missing-parts`` (then it warns at every epoch), ``verify`` names
  a missing array;
- ENOSPC while writing: one line naming the store and what to do, exit 1; the rerun completes and
  equals an uninterrupted build.
"""

from __future__ import annotations

import errno
import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faults  # tools/faults.py
import pytest
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
        reader.read_part("part-00002")
    assert (err.value.part, err.value.array) == ("part-00002", "teacher_entropy")
    split = next(p.split for p in reader.parts if p.name == "part-00002")
    with pytest.raises(CacheCorruptError, match="part-00002.*teacher_entropy"):
        list(reader.iter_sequences(split))
    code, _, stderr = run(cache_main, ["verify", str(out)], capsys)
    assert code == 1 and "part part-00002, array teacher_entropy" in stderr

    # Random access reads a slice, which whole-array checksums cannot cover; a chunk that no longer
    # decodes (here: its Blosc header) still names the part and the array.
    ids = out / fmt.PARTS_GROUP / "part-00003" / "input_ids" / "c" / "0"
    for k in (4, 5, 6):
        flip(ids, k, 0xFF)
    i, split = first_index(reader, "part-00003")
    with pytest.raises(CacheCorruptError, match=r"part part-00003, array input_ids: cannot be read"):
        open_cache(str(out)).get(i, split)


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

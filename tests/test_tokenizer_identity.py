"""Tokenizer identity across model families: one tokenizer.json beside a Qwen2 and a Llama model loads as
two tokenizer classes that fill unk differently, and must still count as the same tokenizer (the cache's
ids mean the same); another vocabulary or another EOS id must not. Caches written with the version-1
fingerprint stay readable and resumable."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase, Qwen2TokenizerFast

from selkd.cache import format as fmt
from selkd.cache import open_cache
from selkd.cache.build import BuildResult, build_cache
from selkd.cache.config import BuildConfig
from selkd.cache.fingerprints import FINGERPRINT_PREFIX, _fingerprint_v1, tokenizer_fingerprint
from selkd.cache.teacher import load_tokenizer
from selkd.trainer.cli import main as train_main

SEQ = 64


@pytest.fixture(scope="module")
def qwen2_teacher_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path, tiny_model: Callable[..., Path]
) -> Path:
    """A tiny Qwen2 model with the conftest's tokenizer.json and the tokenizer_config.json that Qwen2's own
    tokenizer class saves (Qwen2Tokenizer, unk_token <|endoftext|>, as Qwen2 checkpoints have). The class
    re-serializes tokenizer.json with its own pre-tokenizer, so the shared file is copied back: a Llama
    distilled from a Qwen model ships the teacher's tokenizer.json unchanged."""
    tok = Qwen2TokenizerFast.from_pretrained(str(tiny_tokenizer_dir))
    out = tiny_model(
        tmp_path_factory.mktemp("qwen2_teacher"),
        tok,
        hidden=32,
        intermediate=64,
        layers=1,
        heads=2,
        kv_heads=1,
        max_pos=256,
        seed=0,
        arch="qwen2",
    )
    shutil.copyfile(tiny_tokenizer_dir / "tokenizer.json", out / "tokenizer.json")
    return out


def build(teacher: Path, data: Path, out: Path, **kw: object) -> BuildResult:
    settings: dict[str, object] = dict(
        teacher=str(teacher), data=[str(data)], out=str(out), classes="topk:4", max_seq_len=SEQ,
        part_tokens=1024, limit_tokens=2000, eval_fraction=0.1, progress=False, device="cpu", batch_size=8,
    )  # fmt: skip
    settings.update(kw)
    result = build_cache(BuildConfig(**settings))  # type: ignore[arg-type]
    assert result is not None
    return result


def train(cache: Path, student: Path | str, out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = train_main(
        ["--cache", str(cache), "--student", str(student), "--out", str(out), "--steps", "1", "--batch-size", "2",
         "--eval-every", "0", "--save-every", "0", "--num-workers", "0", "--no-progress", "--device", "cpu"]
    )  # fmt: skip
    return rc, capsys.readouterr().err


def with_eos(src: Path, dst: Path, eos: str) -> Path:
    """A copy of a model directory whose tokenizer has the same vocabulary but another EOS token."""
    shutil.copytree(src, dst)
    path = dst / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["eos_token"] = eos
    path.write_text(json.dumps(config))
    return dst


def test_qwen2_and_llama_classes_of_one_tokenizer_share_the_fingerprint(
    qwen2_teacher_dir: Path, tiny_student_dir: Path
) -> None:
    qwen, llama = load_tokenizer(qwen2_teacher_dir), load_tokenizer(tiny_student_dir)
    # the premise: one tokenizer.json, two classes, two unk ids
    assert (qwen2_teacher_dir / "tokenizer.json").read_bytes() == (tiny_student_dir / "tokenizer.json").read_bytes()
    assert json.loads((qwen2_teacher_dir / "config.json").read_text())["model_type"] == "qwen2"
    assert json.loads((tiny_student_dir / "config.json").read_text())["model_type"] == "llama"
    assert type(qwen).__name__.startswith("Qwen2Tokenizer") and not type(llama).__name__.startswith("Qwen2")
    assert qwen.unk_token_id != llama.unk_token_id
    assert qwen.get_vocab() == llama.get_vocab() and qwen.eos_token_id == llama.eos_token_id
    assert _fingerprint_v1(qwen) != _fingerprint_v1(llama)  # why version 1 refused the pair
    assert tokenizer_fingerprint(qwen) == tokenizer_fingerprint(llama)
    assert tokenizer_fingerprint(qwen).startswith(FINGERPRINT_PREFIX)


def test_other_vocabulary_or_eos_changes_the_fingerprint(
    tiny_student_dir: Path, other_tokenizer_model_dir: Path, tmp_path: Path
) -> None:
    base = tokenizer_fingerprint(load_tokenizer(tiny_student_dir))
    assert tokenizer_fingerprint(load_tokenizer(other_tokenizer_model_dir)) != base
    other_eos = load_tokenizer(with_eos(tiny_student_dir, tmp_path / "eos", "<|im_end|>"))
    assert other_eos.get_vocab() == load_tokenizer(tiny_student_dir).get_vocab()
    assert tokenizer_fingerprint(other_eos) != base


def test_qwen2_teacher_cache_trains_a_llama_student(
    qwen2_teacher_dir: Path,
    tiny_student_dir: Path,
    other_tokenizer_model_dir: Path,
    text_corpus_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Scoring (build --student) and training with the Llama student accept the Qwen2 teacher's cache;
    a student with another vocabulary or another EOS id is refused."""
    cache = tmp_path / "cache"
    build(qwen2_teacher_dir, text_corpus_dir, cache, student=str(tiny_student_dir), sample_ratio=0.5)
    assert open_cache(str(cache)).scores()[0].size > 0
    rc, err = train(cache, tiny_student_dir, tmp_path / "run", capsys)
    assert rc == 0, err
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    other_eos = with_eos(tiny_student_dir, tmp_path / "eos", "<|im_end|>")
    for student in (other_tokenizer_model_dir, other_eos):
        rc, err = train(cache, student, tmp_path / f"refused-{student.name}", capsys)
        assert rc == 1 and "tokenizer" in err and "differs" in err


def test_cache_with_a_version_1_fingerprint_stays_readable(
    tiny_teacher_dir: Path,
    tiny_student_dir: Path,
    other_tokenizer_model_dir: Path,
    text_corpus_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cache = tmp_path / "cache"
    build(tiny_teacher_dir, text_corpus_dir, cache)
    root = json.loads((cache / "zarr.json").read_text())
    v1 = _fingerprint_v1(load_tokenizer(tiny_teacher_dir))
    root["attributes"][fmt.ROOT_ATTR]["tokenizer_fingerprint"] = v1  # as a cache written before version 2
    (cache / "zarr.json").write_text(json.dumps(root))
    # a rerun of the same build resumes it (nothing to redo) and keeps the stored fingerprint
    assert build(tiny_teacher_dir, text_corpus_dir, cache).parts_written == 0
    assert open_cache(str(cache)).header["tokenizer_fingerprint"] == v1
    rc, err = train(cache, tiny_student_dir, tmp_path / "run", capsys)
    assert rc == 0, err
    rc, err = train(cache, other_tokenizer_model_dir, tmp_path / "other", capsys)
    assert rc == 1 and "differs" in err


def test_fingerprint_ignores_pad_and_bos(tiny_tokenizer: PreTrainedTokenizerBase, tiny_tokenizer_dir: Path) -> None:
    """pad only fills masked batch positions and bos is never inserted (documents are tokenized without
    special tokens): neither changes what a cached id means."""
    changed = load_tokenizer(tiny_tokenizer_dir)
    changed.pad_token = changed.eos_token
    changed.bos_token = "<|im_start|>"
    assert changed.pad_token_id != tiny_tokenizer.pad_token_id
    assert tokenizer_fingerprint(changed) == tokenizer_fingerprint(tiny_tokenizer)

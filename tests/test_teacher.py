"""Model/tokenizer loading, identity fingerprints and the tiny-model tooling (tools/make_tiny.py)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import make_tiny
import pytest
import torch
from transformers import PreTrainedTokenizerBase

from selkd.cache import teacher
from selkd.cache.fingerprints import config_hash, tokenizer_fingerprint
from selkd.cache.teacher import (
    ModelError,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    vocab_size,
)

# ----------------------------------------------------------------------------- fingerprints


def test_tokenizer_fingerprint_stable_across_save_and_reload(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(tiny_tokenizer_dir)
    fp = tokenizer_fingerprint(tok)
    assert fp.startswith("v2:") and len(fp) == 67 and int(fp[3:], 16) >= 0
    tok.save_pretrained(str(tmp_path))
    assert tokenizer_fingerprint(load_tokenizer(tmp_path)) == fp
    assert tokenizer_fingerprint(load_tokenizer(tmp_path)) == tokenizer_fingerprint(tok)


def test_tokenizer_fingerprint_same_for_teacher_and_student(
    tiny_tokenizer_dir: Path, tiny_teacher_dir: Path, tiny_student_dir: Path
) -> None:
    fps = {tokenizer_fingerprint(load_tokenizer(d)) for d in (tiny_tokenizer_dir, tiny_teacher_dir, tiny_student_dir)}
    assert len(fps) == 1


def test_tokenizer_fingerprint_differs_for_other_tokenizer(
    tiny_tokenizer: PreTrainedTokenizerBase, other_tokenizer_model_dir: Path
) -> None:
    other = load_tokenizer(other_tokenizer_model_dir)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tiny_tokenizer)


def test_tokenizer_fingerprint_sensitive_to_added_tokens_and_eos(tiny_tokenizer_dir: Path) -> None:
    base = tokenizer_fingerprint(load_tokenizer(tiny_tokenizer_dir))
    added = load_tokenizer(tiny_tokenizer_dir)
    added.add_tokens(["<|tool|>"])
    assert tokenizer_fingerprint(added) != base
    other_eos = load_tokenizer(tiny_tokenizer_dir)
    other_eos.eos_token = "<|im_end|>"  # documents would be separated by another id
    assert tokenizer_fingerprint(other_eos) != base


def test_bpe_training_is_deterministic() -> None:
    texts = make_tiny.stdlib_texts(max_files=3)
    a = make_tiny.train_bpe_tokenizer(texts, 280)
    b = make_tiny.train_bpe_tokenizer(texts, 280)
    assert len(a) == 280
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)


def test_config_hash_stable_across_loads_and_dtypes(tiny_teacher_dir: Path) -> None:
    m32 = load_causal_lm(tiny_teacher_dir, device="cpu", dtype="fp32")
    m16 = load_causal_lm(tiny_teacher_dir, device="cpu", dtype="bf16")
    h = config_hash(m32)
    assert len(h) == 64
    assert config_hash(m16) == h
    assert config_hash(m32.config) == h
    # a copy elsewhere (different _name_or_path) is the same model
    copy = Path(shutil.copytree(tiny_teacher_dir, tiny_teacher_dir.parent / "teacher_copy", dirs_exist_ok=True))
    assert config_hash(load_causal_lm(copy, device="cpu")) == h


def test_config_hash_sensitive_to_architecture(tiny_teacher_dir: Path, tiny_student_dir: Path) -> None:
    t = load_causal_lm(tiny_teacher_dir, device="cpu")
    s = load_causal_lm(tiny_student_dir, device="cpu")
    assert config_hash(t) != config_hash(s)
    changed = t.config.__class__.from_dict(t.config.to_dict())
    assert config_hash(changed) == config_hash(t)
    changed.rms_norm_eps = 1e-5
    assert config_hash(changed) != config_hash(t)


def test_config_hash_rejects_non_configs() -> None:
    with pytest.raises(TypeError):
        config_hash({"vocab_size": 3})  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- loading and logits


def test_vocab_size_is_logits_dimension_not_tokenizer_size(big_vocab_teacher_dir: Path, tiny_teacher_dir: Path) -> None:
    big = load_causal_lm(big_vocab_teacher_dir, device="cpu")
    tok = load_tokenizer(big_vocab_teacher_dir)
    assert vocab_size(big) == 151_936
    assert len(tok) == 384 < vocab_size(big)
    ids = tok("def f(x):\n    return x", return_tensors="pt")["input_ids"]
    assert big(input_ids=ids).logits.shape == (1, ids.shape[1], 151_936)
    assert vocab_size(load_causal_lm(tiny_teacher_dir, device="cpu")) == len(tok)


def test_load_causal_lm_frozen_and_trainable(tiny_student_dir: Path) -> None:
    frozen = load_causal_lm(tiny_student_dir, device="cpu")
    assert not frozen.training
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = load_causal_lm(tiny_student_dir, device="cpu", frozen=False)
    assert all(p.requires_grad for p in trainable.parameters())
    bf16 = load_causal_lm(tiny_student_dir, device="cpu", dtype="bfloat16")
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_loaded_weights_match_saved(tiny_teacher_dir: Path) -> None:
    a = load_causal_lm(tiny_teacher_dir, device="cpu")
    tok = load_tokenizer(tiny_teacher_dir)
    ids = {f"{k}_token_id": getattr(tok, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    b = make_tiny.make_llama(len(tok), hidden=64, layers=2, seed=0, **ids)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, msg=name)


# ----------------------------------------------------------------------------- errors


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such_model"
    with pytest.raises(ModelError, match="does not exist") as e:
        load_causal_lm(missing, device="cpu")
    assert str(missing) in str(e.value)
    with pytest.raises(ModelError, match="does not exist") as e:
        load_tokenizer(missing)
    assert str(missing) in str(e.value)
    with pytest.raises(ModelError, match="does not exist"):
        load_causal_lm("./not/here", device="cpu")


def test_path_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(ModelError, match="is a file") as e:
        load_causal_lm(f, device="cpu")
    assert str(f) in str(e.value)


def test_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"no config\.json") as e:
        load_causal_lm(tmp_path, device="cpu")
    assert str(tmp_path) in str(e.value)


def test_dir_without_weights(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_teacher_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelError, match="could not load the weights") as e:
        load_causal_lm(tmp_path, device="cpu")
    assert str(tmp_path) in str(e.value)


def test_bert_is_not_a_causal_lm(bert_dir: Path) -> None:
    with pytest.raises(ModelError, match=r"is not a causal language model \(model_type=bert\)") as e:
        load_causal_lm(bert_dir, device="cpu")
    assert str(bert_dir) in str(e.value)


def test_unknown_model_type(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    cfg = json.loads((tiny_teacher_dir / "config.json").read_text())
    cfg["model_type"] = "no_such_arch_xyz"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="no_such_arch_xyz") as e:
        load_causal_lm(tmp_path, device="cpu")
    assert str(tmp_path) in str(e.value)


def test_missing_tokenizer_files(tmp_path: Path, tiny_model: Callable[..., Path]) -> None:
    tiny_model(tmp_path, vocab=300, hidden=16, layers=1)
    assert load_causal_lm(tmp_path, device="cpu") is not None  # the model itself is fine
    with pytest.raises(ModelError, match="no tokenizer files") as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_hub_id_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    name = "selkd-test-org/no-such-model-xyz"
    with pytest.raises(ModelError, match="hub is unreachable; pass a local path") as e:
        load_causal_lm(name, device="cpu")
    assert name in str(e.value)
    with pytest.raises(ModelError, match="hub is unreachable"):
        load_tokenizer(name)


# ----------------------------------------------------------------------------- device / dtype


def test_resolve_dtype() -> None:
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    for name, dt in [
        ("fp32", torch.float32),
        ("float32", torch.float32),
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("fp16", torch.float16),
        ("float16", torch.float16),
        ("BF16", torch.bfloat16),
        ("torch.float16", torch.float16),
    ]:
        assert resolve_dtype(name, "cpu") == dt
    assert resolve_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    with pytest.raises(ModelError, match="unknown dtype 'float64'"):
        resolve_dtype("float64", "cpu")
    with pytest.raises(ModelError, match="unsupported dtype"):
        resolve_dtype(torch.int8, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resolve_dtype_auto_on_cuda() -> None:
    assert resolve_dtype(None, "cuda") in (torch.bfloat16, torch.float16)


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ModelError, match="unknown device 'warp9'"):
        resolve_device("warp9")
    monkeypatch.setattr(teacher.torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ModelError, match="CUDA is not available"):
        resolve_device("cuda")


# ----------------------------------------------------------------------------- tools/make_tiny.py


def test_stdlib_texts_deterministic_and_bounded() -> None:
    a = make_tiny.stdlib_files(max_bytes=50_000)
    assert a == make_tiny.stdlib_files(max_bytes=50_000)
    assert sum(len(t.encode()) for _, t in a) <= 50_000
    assert [p for p, _ in a] == sorted(p for p, _ in a)
    assert not any(part in ("test", "tests", "idlelib", "site-packages") for p, _ in a for part in p.split("/"))
    assert len(make_tiny.stdlib_texts(max_files=2)) == 2


def test_make_llama_is_seeded_and_keeps_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = make_tiny.make_llama(300, hidden=16, layers=1, seed=5)
    assert torch.equal(torch.rand(3), expected)
    b = make_tiny.make_llama(300, hidden=16, layers=1, seed=5)
    c = make_tiny.make_llama(300, hidden=16, layers=1, seed=6)
    wa, wb, wc = (m.model.embed_tokens.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    tied = make_tiny.make_llama(300, hidden=16, layers=1, tie=True)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()


def test_tiny_tokenizer_specials_and_chat_template(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    tok = tiny_tokenizer
    assert len(tok) == 384
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id
    text = "def f(x):\n    return x  # é ü\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    enc = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "hello<|im_end|>"


def test_text_corpus_dir(text_corpus_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    files = sorted(text_corpus_dir.glob("*.jsonl"))
    assert len(files) == 3
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert all(set(r) == {"text"} and r["text"].strip() for r in rows)
    n = sum(len(tiny_tokenizer(r["text"], add_special_tokens=False)["input_ids"]) for r in rows)
    assert 60_000 <= n < 65_000


def test_make_tiny_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tiny"
    rc = make_tiny.main(["--out", str(out), "--vocab", "300", "--corpus-bytes", "20000", "--train-steps", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "teacher/" in printed and "corpus.jsonl" in printed
    t = load_causal_lm(out / "teacher", device="cpu")
    s = load_causal_lm(out / "student", device="cpu")
    assert vocab_size(t) == vocab_size(s) == 300
    assert tokenizer_fingerprint(load_tokenizer(out / "teacher")) == tokenizer_fingerprint(
        load_tokenizer(out / "student")
    )
    assert t.config.eos_token_id == load_tokenizer(out / "teacher").eos_token_id
    rows = (out / "corpus.jsonl").read_text().splitlines()
    assert rows and all("text" in json.loads(r) for r in rows)
    assert make_tiny.main(["--out", str(out), "--vocab", "100"]) == 2

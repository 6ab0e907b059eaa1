"""Packing without cross-document attention (--doc-attention, on by default).

The issue's test: a document's teacher log-probs are the same whether or not another document precedes
it in the pack, for Llama and Qwen2 with SDPA and eager attention, and they differ with the option off
(so the test can fail). Then the same for every forward that uses it: the cache build, the online
teacher, the student's training forward and evaluation, and the trainer's step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from selkd.cache import open_cache
from selkd.cache.build import build_cache
from selkd.cache.classes import ClassSpec
from selkd.cache.config import BuildConfig
from selkd.cache.doc_attention import attention_inputs, check_separates, segment_position_ids
from selkd.cache.errors import BuildError
from selkd.cache.teacher import load_causal_lm, load_tokenizer
from selkd.trainer.batch import collate
from selkd.trainer.online import OnlineTeacher
from selkd.trainer.student import Objective, SelectiveStudent, evaluate

TEXT_A = "def first(xs):\n    return xs[0] if xs else None\n"
TEXT_B = "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n"


def doc_ids(tokenizer: Any, text: str) -> list[int]:
    """A document as the token store holds it: its tokens, then EOS."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model, tiny_tokenizer):
    return tiny_model(tmp_path_factory.mktemp(request.param), tiny_tokenizer, seed=4, arch=request.param)


@pytest.fixture(scope="module")
def ab(model_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(pack [1, nA + nB] = doc A then doc B, doc B alone [1, nB]) as int64 token ids, tokenized as a
    build with this teacher tokenizes them."""
    tokenizer = load_tokenizer(str(model_dir))
    a, b = doc_ids(tokenizer, TEXT_A), doc_ids(tokenizer, TEXT_B)
    return torch.tensor([a + b]), torch.tensor([b])


def starts_of(pack: torch.Tensor, n_b: int) -> torch.Tensor:
    doc_start = torch.zeros_like(pack, dtype=torch.bool)
    doc_start[:, 0] = True
    doc_start[:, pack.shape[1] - n_b] = True
    return doc_start


def test_segment_position_ids_restart_per_document_and_at_padding() -> None:
    doc_start = torch.tensor([[1, 0, 0, 1, 0, 1], [0, 0, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])  # none, right, left padding
    want = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 0, 1], [0, 1, 0, 1, 2, 3]])
    assert torch.equal(segment_position_ids(doc_start, mask), want)
    assert torch.equal(segment_position_ids(doc_start[:1]), want[:1])


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_teacher_logprobs_of_a_document_do_not_depend_on_the_one_before(model_dir: Path, ab, impl: str) -> None:
    """The issue's test: log-probs at B's tokens, B packed after A vs B alone, agree to fp32 tolerance with
    the option on and differ with it off; in a right-padded batch too."""
    model = load_causal_lm(str(model_dir), torch.device("cpu"), torch.float32)
    model.set_attn_implementation(impl)
    pack, alone = ab
    n_b = alone.shape[1]
    doc_start = starts_of(pack, n_b)
    with torch.no_grad():
        want = torch.log_softmax(model(input_ids=alone).logits[0], -1)
        for separate in (True, False):
            logits = model(input_ids=pack, **attention_inputs(doc_start, None, separate)).logits
            got = torch.log_softmax(logits[0, -n_b:], -1)
            if separate:
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            else:
                assert (got - want).abs().max() > 1e-2  # the test has teeth: across documents they differ
        # right padding: [A + B] and [B + padding] in one batch, with the 2-D padding mask
        padded = torch.cat([pack, torch.cat([alone, torch.zeros_like(pack[:, : pack.shape[1] - n_b])], 1)])
        mask = torch.ones_like(padded)
        mask[1, n_b:] = 0
        starts = torch.cat([doc_start, torch.zeros_like(doc_start)])
        starts[1, 0] = True
        logits = model(input_ids=padded, **attention_inputs(starts, mask, True)).logits
    torch.testing.assert_close(torch.log_softmax(logits[0, -n_b:], -1), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.log_softmax(logits[1, :n_b], -1), want, atol=1e-5, rtol=1e-5)
    check_separates(model, "the tiny model")  # the start-up check passes


def test_a_model_that_ignores_the_segments_is_refused(model_dir: Path) -> None:
    model = load_causal_lm(str(model_dir), torch.device("cpu"), torch.float32)

    class Across(type(model)):  # type: ignore[misc, valid-type]
        def forward(self, *a: Any, position_ids: Any = None, **kw: Any) -> Any:
            return super().forward(*a, **kw)  # drops the per-document position ids

    across = Across(model.config).train()
    across.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match=r"--teacher T: Across .* lets packed documents attend to each other"):
        check_separates(across, "--teacher T")
    assert across.training  # the check leaves the training flag as it was


# --------------------------------------------------------------------------- the cache build


def build(teacher: Path, tmp: Path, name: str, texts: list[str], seq_len: int, **kw: Any) -> Any:
    data = tmp / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp / name
    build_cache(
        BuildConfig(
            teacher=str(teacher),
            data=[str(data)],
            out=str(out),
            classes="full",
            max_seq_len=seq_len,
            eval_fraction=0.0,
            device="cpu",
            progress=False,
            **kw,
        )
    )
    return open_cache(str(out))


def test_cache_targets_of_a_packed_document_equal_those_of_the_document_alone(
    tmp_path: Path, model_dir: Path, tiny_tokenizer: Any, ab
) -> None:
    pack, alone = ab
    n, n_b = pack.shape[1], alone.shape[1]
    b_alone = build(model_dir, tmp_path, "b", [TEXT_B], n_b).get(0)
    assert np.array_equal(b_alone.input_ids, alone[0].numpy())
    for on in (True, False):
        reader = build(model_dir, tmp_path, f"ab-{on}", [TEXT_A, TEXT_B], n, doc_attention=on)
        assert reader.header["settings"]["doc_attention"] is on
        packed = reader.get(0)
        assert np.array_equal(packed.input_ids, pack[0].numpy()) and packed.doc_start.sum() == 2
        got, want = packed.targets.logprobs[n - n_b :], b_alone.targets.logprobs  # B's n_b - 1 targets
        if on:
            torch.testing.assert_close(got, want, atol=2e-3, rtol=0)  # the cache stores float16
            np.testing.assert_allclose(packed.teacher_entropy[n - n_b :], b_alone.teacher_entropy, atol=2e-3)
        else:
            assert (got - want).abs().max() > 5e-2
    with pytest.raises(BuildError, match=r"--doc-attention: False -> True"):  # a rerun must match
        build(model_dir, tmp_path, "ab-False", [TEXT_A, TEXT_B], n)
    # a cache of selkd before the option (no doc_attention in its header) attended across documents
    root = tmp_path / "ab-False" / "zarr.json"
    meta = json.loads(root.read_text())
    del meta["attributes"]["selkd"]["settings"]["doc_attention"]
    root.write_text(json.dumps(meta))
    build(model_dir, tmp_path, "ab-False", [TEXT_A, TEXT_B], n, doc_attention=False)  # resumes (nothing to do)
    with pytest.raises(BuildError, match=r"--doc-attention: False -> True"):
        build(model_dir, tmp_path, "ab-False", [TEXT_A, TEXT_B], n)


def test_online_teacher_targets_of_a_packed_document_equal_those_of_the_document_alone(model_dir: Path, ab) -> None:
    pack, alone = ab
    n_b = alone.shape[1]
    model = load_causal_lm(str(model_dir), torch.device("cpu"), torch.float32)
    for on in (True, False):
        live = OnlineTeacher(model, ClassSpec.parse("full"), 1.0, doc_attention=on)
        seqs = [pack[0].numpy(), alone[0].numpy()]
        starts = [starts_of(pack, n_b)[0].numpy(), np.eye(1, n_b, 0, dtype=bool)[0]]
        packed, single = live.sequences(seqs, np.arange(2), starts)
        gap = (packed.targets.logprobs[-(n_b - 1) :] - single.targets.logprobs).abs().max()
        assert gap < 1e-5 if on else gap > 1e-2


# --------------------------------------------------------------------------- the student


def batches(tokenizer: Any, ab) -> tuple[Any, Any, int]:
    """Trainer batches of [A + B] (with B + padding beside it) and of B alone, full targets made by the
    online teacher code from a uniform stand-in (the student's outputs are what is compared)."""
    from selkd.cache.reader import CachedSequence
    from selkd.cache.targets import SparseTargets

    pack, alone = ab
    n, n_b = pack.shape[1], alone.shape[1]
    vocab = len(tokenizer)

    def seq(ids: torch.Tensor, starts: np.ndarray, i: int) -> CachedSequence:
        m = ids.shape[0] - 1
        logprobs = torch.full((m, vocab), -float(np.log(vocab)))
        targets = SparseTargets("full", None, logprobs, None, None)
        zeros = np.zeros(m, np.float32)
        return CachedSequence(i, ids.numpy().astype(np.int32), starts, zeros, zeros, targets)

    pack_starts = starts_of(pack, n_b)[0].numpy()
    b_starts = np.eye(1, n_b, 0, dtype=bool)[0]
    both = collate([seq(pack[0], pack_starts, 0), seq(alone[0], b_starts, 1)], pad_id=0)
    single = collate([seq(alone[0], b_starts, 1)], pad_id=0)
    return both, single, n - n_b


@pytest.mark.parametrize("on", [True, False])
def test_student_training_forward_and_evaluation_keep_documents_apart(
    model_dir: Path, tiny_tokenizer: Any, ab, on: bool
) -> None:
    """The student's per-position KD loss (training forward) and its evaluation CE at B's positions: the
    same after A as alone with the option on, different with it off."""
    both, single, off = batches(tiny_tokenizer, ab)
    n_b = single.input_ids.shape[1]
    student = SelectiveStudent(load_causal_lm(str(model_dir), torch.device("cpu"), torch.float32), on)
    obj = Objective("none", 1.0, "none", "fkl")
    res_both = student(*both.student_inputs(), obj, doc_start=both.doc_start)
    res_single = student(*single.student_inputs(), obj, doc_start=single.doc_start)
    got, want = res_both.per_position[0, off : off + n_b - 1], res_single.per_position[0, : n_b - 1]
    padded_row = res_both.per_position[1, : n_b - 1]  # B beside A's row, right-padded
    torch.testing.assert_close(padded_row, want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(got, want, atol=1e-5) is on
    # evaluation over B's positions only (the others masked out): the same CE as B alone
    both.valid[:, :off] = False
    both.valid[1] = False
    ev_both = evaluate(student, [both], obj, torch.device("cpu"))
    ev_single = evaluate(student, [single], obj, torch.device("cpu"))
    assert ev_both["eval_positions"] == ev_single["eval_positions"] == n_b - 1
    assert (ev_both["eval_ce"] == pytest.approx(ev_single["eval_ce"], rel=1e-5)) is on


# --------------------------------------------------------------------------- selkd-train


def test_train_follows_the_cache_and_notes_an_override(
    tmp_path: Path,
    tiny_teacher_dir: Path,
    tiny_student_dir: Path,
    text_corpus_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real `selkd-train --cache` run: its steps and evaluation give the student's decoder per-document
    position ids and no 2-D mask (the cache was built with the default --doc-attention); with
    --no-doc-attention the plain padding mask, and the difference from the cache is noted once."""
    from transformers import LlamaModel

    from selkd.trainer.cli import main as train_main

    cache = tmp_path / "cache"
    build_cache(
        BuildConfig(
            teacher=str(tiny_teacher_dir),
            data=[str(text_corpus_dir)],
            out=str(cache),
            classes="topk:8",
            max_seq_len=64,
            limit_tokens=3000,
            eval_fraction=0.1,
            device="cpu",
            progress=False,
        )
    )
    calls: list[dict[str, Any]] = []
    forward = LlamaModel.forward

    def spy(self: Any, *a: Any, **kw: Any) -> Any:  # records what the decoder gets, runs it unchanged
        rows = kw["input_ids"].shape[0]  # 4 in the steps and evaluation, 1 in the start-up probes
        calls.append({"rows": rows, "position_ids": kw.get("position_ids"), "attention_mask": kw.get("attention_mask")})
        return forward(self, *a, **kw)

    monkeypatch.setattr(LlamaModel, "forward", spy)
    common = ["--cache", str(cache), "--student", str(tiny_student_dir), "--steps", "2", "--batch-size", "4"]
    common += ["--eval-every", "0", "--save-every", "0", "--num-workers", "0", "--no-progress", "--device", "cpu"]
    for flags, separate in (([], True), (["--no-doc-attention"], False)):
        calls.clear()
        capsys.readouterr()
        assert train_main([*common, "--out", str(tmp_path / f"run-{separate}"), *flags]) == 0
        err = capsys.readouterr().err
        batch_calls = [c for c in calls if c["rows"] == 4]
        assert len(batch_calls) >= 3  # 2 steps and the final evaluation's first batch
        if separate:
            assert all(c["attention_mask"] is None and c["position_ids"] is not None for c in batch_calls)
            restarts = [bool((c["position_ids"][:, 1:] == 0).any()) for c in batch_calls]
            assert any(restarts)  # some packed sequence holds a document start past its first token
            assert "note:" not in err
        else:
            assert all(c["position_ids"] is None and c["attention_mask"] is not None for c in batch_calls)
            assert err.count("note: --no-doc-attention: the student attends across document boundaries") == 1

"""Chat data distils the assistant's tokens only (issue 11): the loss mask of a chat row (from the chat
template's generation markers, else from its rendered turns) is computed at prepare time, stored in the
token store and the cache, and only positions before an assistant token get a target that trains:
selection, KD and CE never see a prompt position. A sequence with no such position is skipped and
counted; token stores and caches written before the mask read as "every position trains"."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_corpus import CHAT_TEMPLATE, build_tokenizer, write_jsonl

from selkd.cache import format as fmt
from selkd.cache import open_cache
from selkd.cache.build import build_cache
from selkd.cache.config import BuildConfig
from selkd.cache.corpus import load_corpus
from selkd.cache.errors import DataError
from selkd.cache.info import cache_info
from selkd.cache.modes import ClassSpec
from selkd.cache.store import Storage
from selkd.cache.teacher import load_causal_lm
from selkd.cache.tokens import CACHE_TOKENS_PREFIX, LOSS_MASK, TokenStore
from selkd.cache.verify import verify_cache
from selkd.cache.writer import array_checksum, write_array
from selkd.trainer.batch import IGNORE_INDEX, collate
from selkd.trainer.cli import main as train_main
from selkd.trainer.online import OnlineStream, OnlineTeacher
from selkd.trainer.student import Objective, SelectiveStudent

SEQ = 32
# A template with {% generation %} markers around each assistant turn (test_corpus.CHAT_TEMPLATE has none).
GENERATION_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }}<|end|>{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CONVERSATION = [
    {"role": "user", "content": "the quick brown fox"},
    {"role": "assistant", "content": "a lazy dog"},
    {"role": "user", "content": "share one cache"},
    {"role": "assistant", "content": "while teacher and student"},
]


def trained_text(tok: Any, tokens: np.ndarray, mask: np.ndarray) -> str:
    return tok.decode(tokens[mask].tolist())


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (GENERATION_TEMPLATE, "a lazy dog<|end|>while teacher and student<|end|>"),
        # no markers: a turn spans from the end of the prompt before it to the end of the conversation up to it
        (CHAT_TEMPLATE, "<|assistant|>a lazy dog\n<|assistant|>while teacher and student\n"),
    ],
    ids=["generation-markers", "rendered-turns"],
)
def test_prepare_marks_the_assistant_tokens_of_chat_rows_and_every_token_of_text(
    tmp_path: Path, template: str, expected: str
) -> None:
    tok = build_tokenizer(tmp_path / "tok", template)
    rows = [{"text": "the dog and the fox"}, {"messages": CONVERSATION}, {"text": "one cache"}]
    corpus = load_corpus([str(write_jsonl(tmp_path / "d.jsonl", rows))], tok, SEQ, progress=False)
    tokens, mask, starts = corpus.tokens, corpus.loss_mask, np.flatnonzero(corpus.doc_start)
    assert mask is not None and mask.shape == tokens.shape
    docs = np.split(np.arange(len(tokens)), starts[1:])
    text_a, chat, text_b = docs
    assert mask[text_a].all() and mask[text_b].all()  # plain text, its EOS included
    assert trained_text(tok, tokens[chat], mask[chat]) == expected  # no prompt token, no EOS after the chat
    assert not mask[chat[-1]] and tokens[chat[-1]] == tok.eos_token_id


def test_a_template_that_renders_prefixes_differently_is_refused(tmp_path: Path) -> None:
    """Without generation markers the turns are found by rendering prefixes; a template that marks the
    last message renders a prefix that is not a prefix of the whole conversation."""
    template = (
        "{% for m in messages %}{% if loop.last %}[END]{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    )
    tok = build_tokenizer(tmp_path / "tok", template)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "the dog"}, {"messages": CONVERSATION}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: the chat template renders .* assistant turn 1 .* generation"):
        load_corpus([str(data)], tok, SEQ, progress=False)


# --------------------------------------------------------------------------------------- build


def chat_corpus(root: Path) -> Path:
    """Chat rows, plain text rows, and a long user-only chat row: some whole SEQ-token sequences of it
    have no assistant token."""
    rows: list[Any] = []
    for i in range(24):
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Question {i}: what does os.path.join({i}, 'x') return?"},
                    {"role": "assistant", "content": f"It returns the path '{i}/x', joined with os.sep."},
                ]
            }
        )
        rows.append({"text": f"def f{i}(x):\n    return x * {i} + len(str(x))\n"})
    rows.insert(5, {"messages": [{"role": "user", "content": "import os\n" * 80}]})
    return write_jsonl(root / "chat.jsonl", rows)


def build(out: Path, teacher: Path, data: Path, **kw: Any) -> str:
    settings: dict[str, Any] = dict(
        teacher=str(teacher),
        data=[str(data)],
        out=str(out),
        classes="topk:4",
        max_seq_len=SEQ,
        part_tokens=256,
        eval_fraction=0.1,
        progress=False,
        device="cpu",
    )
    build_cache(BuildConfig(**{**settings, **kw}))
    return str(out)


@pytest.fixture(scope="module")
def chat_caches(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> dict[str, str]:
    root = tmp_path_factory.mktemp("chat_caches")
    data = chat_corpus(root)
    return {
        "assistant": build(root / "assistant", tiny_teacher_dir, data),
        "all": build(root / "all", tiny_teacher_dir, data, loss_on="all"),
    }


def token_store(cache: str) -> TokenStore:
    return TokenStore.open(f"{cache}/{CACHE_TOKENS_PREFIX}")


def stored(cache: str) -> list[Any]:
    reader = open_cache(cache)
    return [*reader.iter_sequences("train"), *reader.iter_sequences("eval")]


def test_no_prompt_position_gets_a_target_and_sequences_without_one_are_skipped(chat_caches: dict[str, str]) -> None:
    cache = chat_caches["assistant"]
    packed = token_store(cache).packed(SEQ)
    want = [fmt.trained_targets(m) for m in packed.loss_masks(np.arange(packed.n_sequences), "assistant")]
    assert any(not w.all() for w in want) and any(not w.any() for w in want)  # prompts, and whole prompt sequences
    seqs = stored(cache)
    for s in seqs:  # a stored target trains iff the token it predicts is an assistant (or plain-text) token
        assert s.trained is not None and np.array_equal(s.trained, want[s.seq_index]) and s.trained.any()
    skipped = {i for i, w in enumerate(want) if not w.any()}
    assert skipped and not skipped & {s.seq_index for s in seqs}
    info = cache_info(open_cache(cache))
    assert info.sequences_skipped == len(skipped) and info.sequences_stored + len(skipped) == packed.n_sequences
    assert info.loss_on == "assistant" and info.positions_trained == sum(int(s.trained.sum()) for s in seqs)
    assert "skipped (no assistant token)" in str(info) and verify_cache(open_cache(cache)) == []


def test_loss_on_all_keeps_every_position(chat_caches: dict[str, str]) -> None:
    packed = token_store(chat_caches["all"]).packed(SEQ)
    seqs = stored(chat_caches["all"])
    assert len(seqs) == packed.n_sequences and all(s.trained is not None and s.trained.all() for s in seqs)
    info = cache_info(open_cache(chat_caches["all"]))
    assert info.sequences_skipped == 0 and info.positions_trained == info.positions_stored


def test_a_training_step_selects_and_trains_only_assistant_positions(
    chat_caches: dict[str, str], tiny_student_dir: Path
) -> None:
    seqs = stored(chat_caches["assistant"])[:8]
    batch = collate(seqs, pad_id=0)
    for b, s in enumerate(seqs):
        n = len(s) - 1
        assert torch.equal(batch.valid[b, :n], torch.from_numpy(s.trained)) and not batch.valid[b, n:].any()
    assert (batch.labels[~batch.valid] == IGNORE_INDEX).all()  # CE sees no prompt position either
    assert batch.num_targets < sum(len(s) - 1 for s in seqs)  # there are prompt positions to leave out
    model = load_causal_lm(str(tiny_student_dir), torch.device("cpu"), torch.float32, frozen=False)
    obj = Objective("student-entropy", 0.5, "batch", "fkl", ce_weight=1.0)
    res = SelectiveStudent(model)(*batch.student_inputs(), obj)
    assert res.n_selected > 0 and not (res.selected & ~batch.valid).any() and res.n_valid == batch.num_targets
    assert not res.per_position[~batch.valid].any()


def test_train_refuses_another_loss_on_than_the_caches(
    chat_caches: dict[str, str], tiny_student_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--student", str(tiny_student_dir), "--steps", "1", "--batch-size", "2", "--device", "cpu"]
    common += ["--progress", "false", "--save-every", "0", "--eval-every", "0", "--num-workers", "0"]
    capsys.readouterr()
    rc = train_main(["--cache", chat_caches["assistant"], "--out", str(tmp_path / "a"), "--loss-on", "all", *common])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "--loss-on all" in err and "--loss-on assistant" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "a" / "final").exists()
    rc = train_main(
        ["--cache", chat_caches["assistant"], "--out", str(tmp_path / "b"), "--loss-on", "assistant", *common]
    )
    assert rc == 0


def test_online_batches_have_the_caches_valid_positions(chat_caches: dict[str, str], tiny_teacher_dir: Path) -> None:
    packed = token_store(chat_caches["assistant"]).packed(SEQ)
    teacher = load_causal_lm(str(tiny_teacher_dir), torch.device("cpu"), torch.float32)
    live = OnlineTeacher(teacher, ClassSpec.parse("topk:4"), 1.0)
    stream = OnlineStream(
        packed, live, split="train", eval_fraction=0.1, batch_size=8, seed=0, shuffle=False, loss_on="assistant"
    )
    batch = next(iter(stream))
    masks = packed.loss_masks(batch.seq_index.numpy(), "assistant")
    for b, m in enumerate(masks):
        assert torch.equal(batch.valid[b, : len(m) - 1], torch.from_numpy(fmt.trained_targets(m)))
    assert not batch.valid.all()


# ----------------------------------------------------------------------------------- old stores


def test_caches_and_token_stores_without_the_mask_read_as_all_trained(
    chat_caches: dict[str, str], tmp_path: Path
) -> None:
    old = tmp_path / "old"
    shutil.copytree(chat_caches["all"], old)
    for mask in (old / CACHE_TOKENS_PREFIX / "shards").glob(f"*/{LOSS_MASK}"):
        shutil.rmtree(mask)  # a token store prepared before the mask
    for part in (old / "parts").glob("part-*"):
        shutil.rmtree(part / "loss_mask")
    for record in (old / "selkd" / "commits").glob("*.json"):
        rec = json.loads(record.read_text())
        del rec["arrays"]["loss_mask"], rec["n_trained"]
        record.write_text(json.dumps(rec))
    root = json.loads((old / "zarr.json").read_text())
    del root["attributes"]["selkd"]["settings"]["loss_on"]
    (old / "zarr.json").write_text(json.dumps(root))

    store = token_store(str(old))
    assert store.read_mask(0, store.n_tokens).all()
    reader = open_cache(str(old))
    assert reader.loss_on == "all" and verify_cache(reader) == []
    seqs = list(reader.iter_sequences("train"))
    assert seqs and all(s.trained is None for s in seqs)
    ranged = reader.read_range(reader.split_parts("train")[0], 0, 2).sequence(1)
    assert ranged.trained is None
    batch = collate(seqs[:4], pad_id=0)
    assert batch.num_targets == sum(len(s) - 1 for s in seqs[:4])
    info = cache_info(reader)
    assert info.sequences_skipped == 0 and info.positions_trained == info.positions_stored


def test_verify_names_a_loss_mask_of_the_wrong_length(chat_caches: dict[str, str], tmp_path: Path) -> None:
    """A part whose loss_mask (consistent with its commit record) has not one row per token."""
    bad = tmp_path / "bad"
    shutil.copytree(chat_caches["assistant"], bad)
    storage = Storage.open(str(bad), mode="w")
    short = np.ones(5, np.bool_)
    write_array(storage, "parts/part-00000/loss_mask", short)
    record_path = bad / "selkd" / "commits" / "part-00000.json"
    rec = json.loads(record_path.read_text())
    rec["arrays"]["loss_mask"].update(sha256=array_checksum(short), shape=[5])
    record_path.write_text(json.dumps(rec))
    problems = [str(p) for p in verify_cache(open_cache(str(bad)))]
    assert problems == ["part part-00000, array loss_mask: length != the number of tokens (input_ids)"]

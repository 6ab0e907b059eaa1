"""Tests of selkd.cache.corpus with a small real byte-level BPE tokenizer trained in the fixture."""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selkd.cache.corpus import PackedCorpus, eval_mask, load_corpus
from selkd.cache.documents import CorpusStats, iter_documents
from selkd.cache.errors import DataError
from selkd.cache.sources import resolve_specs

EOS = "<|endoftext|>"
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"]
WORDS += ["while", "teacher", "and", "student", "share", "one", "cache"]


def build_tokenizer(out_dir: Path, chat_template: str | None = CHAT_TEMPLATE) -> Any:
    """Train a ~300-token byte-level BPE on generated text, wrap, save and load it back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[EOS, "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token="<pad>")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok_no_chat(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tokenizer(tmp_path_factory.mktemp("tok_nochat"), chat_template=None)


def encode(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def expected_stream(tok: Any, docs: list[str]) -> list[int]:
    out: list[int] = []
    for d in docs:
        out += [*encode(tok, d), tok.eos_token_id]
    return out


def write_jsonl(path: Path, rows: list[Any], gz: bool = False) -> Path:
    data = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def load(specs: Any, tok: Any, **kw: Any) -> PackedCorpus:
    kw.setdefault("progress", False)
    return load_corpus(specs, tok, **kw)


# ---------------------------------------------------------------------------------------------------
# file kinds


def test_txt_is_one_document(tmp_path: Path, tok: Any) -> None:
    text = "the quick brown fox\n\njumps over the lazy dog\n"
    (tmp_path / "a.txt").write_text(text)
    c = load(str(tmp_path / "a.txt"), tok, max_seq_len=1000)
    assert c.tokens.dtype == np.int32 and c.doc_start.dtype == np.bool_
    assert c.tokens.tolist() == expected_stream(tok, [text])
    assert c.stats.documents == 1 and c.stats.files == 1
    assert c.doc_start.sum() == 1 and c.doc_start[0]
    assert c.stats.warnings() == []


def test_jsonl_and_gz(tmp_path: Path, tok: Any) -> None:
    docs = ["hello teacher", "the student learns", "one cache"]
    write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs[:2]])
    write_jsonl(tmp_path / "b.jsonl.gz", [{"text": docs[2], "other": 1}], gz=True)
    c = load([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.gz")], tok, max_seq_len=64)
    assert c.tokens.tolist() == expected_stream(tok, docs)
    assert c.stats.documents == 3 and c.stats.files == 2


def test_custom_text_field(tmp_path: Path, tok: Any) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"body": "lazy dog"}, {"text": "ignored"}])
    c = load(str(tmp_path / "a.jsonl"), tok, text_field="body")
    assert c.tokens.tolist() == expected_stream(tok, ["lazy dog"])
    assert c.stats.rows_missing_field == 1 and c.stats.first_missing == f"{tmp_path / 'a.jsonl'}:2"


def test_parquet(tmp_path: Path, tok: Any) -> None:
    docs = ["quick fox", "lazy dog", "share one cache"]
    pq.write_table(pa.table({"text": docs, "id": [1, 2, 3]}), tmp_path / "a.parquet", row_group_size=2)
    c = load(str(tmp_path / "a.parquet"), tok)
    assert c.tokens.tolist() == expected_stream(tok, docs)


def test_parquet_null_rows_counted(tmp_path: Path, tok: Any) -> None:
    pq.write_table(pa.table({"text": ["quick fox", None, "dog"]}), tmp_path / "a.parquet")
    c = load(str(tmp_path / "a.parquet"), tok)
    assert c.tokens.tolist() == expected_stream(tok, ["quick fox", "dog"])
    assert c.stats.rows_missing_field == 1 and c.stats.first_missing == f"{tmp_path / 'a.parquet'}:2"


def test_parquet_without_column(tmp_path: Path, tok: Any) -> None:
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a\.parquet.*'text'.*body"):
        load(str(tmp_path / "a.parquet"), tok)


def test_saved_dataset_dir(tmp_path: Path, tok: Any) -> None:
    datasets = pytest.importorskip("datasets")
    docs = ["teacher and student", "quick brown fox", "lazy dog"]
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "ds"))
    c = load(str(tmp_path / "ds"), tok)
    assert c.tokens.tolist() == expected_stream(tok, docs)
    [src] = resolve_specs([str(tmp_path / "ds")])
    assert src.kind == "hf_dataset"

    # a saved dataset nested in a plain directory is one source, next to ordinary files
    (tmp_path / "mix").mkdir()
    datasets.Dataset.from_dict({"text": ["dog"]}).save_to_disk(str(tmp_path / "mix" / "b"))
    (tmp_path / "mix" / "a.txt").write_text("fox")
    assert [s.kind for s in resolve_specs([str(tmp_path / "mix")])] == ["txt", "hf_dataset"]


def test_saved_dataset_dict(tmp_path: Path, tok: Any) -> None:
    datasets = pytest.importorskip("datasets")
    one = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["fox"]})})
    one.save_to_disk(str(tmp_path / "one"))
    assert load(str(tmp_path / "one"), tok).tokens.tolist() == expected_stream(tok, ["fox"])
    two = datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": ["fox"]}) for s in ("train", "test")})
    two.save_to_disk(str(tmp_path / "two"))
    with pytest.raises(DataError, match=r"two.*test, train.*split"):
        load(str(tmp_path / "two"), tok)


# ---------------------------------------------------------------------------------------------------
# directories, globs, order


def test_directory_recursive_sorted(tmp_path: Path, tok: Any) -> None:
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("dog")
    (root / "a.txt").write_text("fox")
    (root / "sub" / "c.txt").write_text("cache")
    write_jsonl(root / "sub" / "d.jsonl", [{"text": "teacher"}])
    (root / "README.md").write_text("not data")
    (root / ".hidden.txt").write_text("hidden")
    names = [s.path.name for s in resolve_specs([str(root)])]
    assert names == ["a.txt", "b.txt", "c.txt", "d.jsonl"]
    c = load(str(root), tok)
    assert c.tokens.tolist() == expected_stream(tok, ["fox", "dog", "cache", "teacher"])
    assert c.stats.files == 4


def test_glob_sorted_and_spec_order(tmp_path: Path, tok: Any) -> None:
    for name, text in [("x2.txt", "two"), ("x1.txt", "one"), ("x3.md", "no"), ("z.txt", "zed")]:
        (tmp_path / name).write_text(text)
    srcs = resolve_specs([str(tmp_path / "z.txt"), str(tmp_path / "x*")])
    assert [s.path.name for s in srcs] == ["z.txt", "x1.txt", "x2.txt"]
    # a source reached twice is kept once, in its first place
    srcs = resolve_specs([str(tmp_path / "x1.txt"), str(tmp_path / "*.txt")])
    assert [s.path.name for s in srcs] == ["x1.txt", "x2.txt", "z.txt"]
    c = load([str(tmp_path / "z.txt"), str(tmp_path / "x*.txt")], tok)
    assert c.tokens.tolist() == expected_stream(tok, ["zed", "one", "two"])


# ---------------------------------------------------------------------------------------------------
# row handling


def test_chat_messages_rendered(tmp_path: Path, tok: Any) -> None:
    msgs = [{"role": "user", "content": "quick fox"}, {"role": "assistant", "content": "lazy dog"}]
    write_jsonl(tmp_path / "a.jsonl", [{"messages": msgs}, {"text": "plain"}])
    c = load(str(tmp_path / "a.jsonl"), tok)
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    assert rendered == "<|user|>quick fox\n<|assistant|>lazy dog\n"
    assert c.tokens.tolist() == expected_stream(tok, [rendered, "plain"])
    assert c.stats.chat_rows == 1 and c.stats.rows_missing_field == 0


def test_chat_messages_parquet(tmp_path: Path, tok: Any) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    pq.write_table(pa.table({"messages": [msgs]}), tmp_path / "c.parquet")
    c = load(str(tmp_path / "c.parquet"), tok)
    assert c.tokens.tolist() == expected_stream(tok, ["<|user|>hi\n"])
    assert c.stats.chat_rows == 1


def test_chat_without_template(tmp_path: Path, tok_no_chat: Any) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"chat\.jsonl:1.*no chat template"):
        load(str(path), tok_no_chat)


def test_missing_field_counted_and_skipped(tmp_path: Path, tok: Any) -> None:
    path = write_jsonl(
        tmp_path / "a.jsonl", [{"text": "fox"}, {"title": "x"}, {"text": None}, ["list"], {"text": "dog"}]
    )
    c = load(str(path), tok)
    assert c.tokens.tolist() == expected_stream(tok, ["fox", "dog"])
    assert c.stats.rows_missing_field == 3
    assert c.stats.first_missing == f"{path}:2"
    [warning] = c.stats.warnings()
    assert "3 row(s)" in warning and f"{path}:2" in warning


def test_bad_bytes_replaced_and_counted(tmp_path: Path, tok: Any) -> None:
    """A few rows with bytes that are not UTF-8 (at most half of their file) stay a counted warning."""
    (tmp_path / "b.txt").write_bytes("clean \ufffd literal".encode())  # a real U+FFFD is not counted
    lines = (
        b'{"text": "ok"}\n{"text": "fine"}\n{"text": "good"}\n{"text": "bad \xc3 byte"}\n{"text": "bad \xff again"}\n'
    )
    (tmp_path / "c.jsonl").write_bytes(lines)
    c = load([str(tmp_path / p) for p in ("b.txt", "c.jsonl")], tok)
    expected = ["clean \ufffd literal", "ok", "fine", "good", "bad \ufffd byte", "bad \ufffd again"]
    assert c.tokens.tolist() == expected_stream(tok, expected)
    assert c.stats.docs_with_replaced_bytes == 2
    assert c.stats.first_replaced == f"{tmp_path / 'c.jsonl'}:4"
    assert any("2 document(s)" in w for w in c.stats.warnings())


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (random_bytes(4096), "not valid UTF-8"),
        (b"fox \xff\xfe dog", "not valid UTF-8"),
        ("valid UTF-8 (é) with a NUL \x00 byte".encode(), r"binary \(NUL bytes\)"),
    ],
    ids=["random-bytes", "latin-1-bytes", "nul"],
)
def test_txt_that_is_not_text_is_refused(tmp_path: Path, tok: Any, content: bytes, what: str) -> None:
    """A .txt file is one document: if it is not UTF-8 text it is refused by name, not packed as U+FFFD."""
    (tmp_path / "good.txt").write_text("a clean document")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    with pytest.raises(DataError, match=rf"bad.txt: not a text file: 1 of 1 document\(s\) are {what};") as err:
        load([str(tmp_path / "good.txt"), str(bad)], tok)
    assert "\n" not in str(err.value) and "convert it to UTF-8 text or leave it out of --data" in str(err.value)
    # also when --limit-tokens stops reading inside that file
    with pytest.raises(DataError, match="bad.txt: not a text file"):
        load(str(bad), tok, limit_tokens=2)


def test_jsonl_mostly_not_text_is_refused(tmp_path: Path, tok: Any) -> None:
    """More than half of a file's rows undecodable, binary or not JSON: refused, naming the file, the
    counts and the first bad line; exactly half is still a warning."""
    good = [b'{"text": "fine"}\n'] * 2
    bad = [
        b'{"text": "caf\xe9"}\n',
        b'{"text": "nul \\u0000 row"}\n',
        random_bytes(60, seed=3).replace(b"\n", b" ") + b"\n",
    ]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"".join(good + bad))
    with pytest.raises(
        DataError,
        match=rf"rows.jsonl: not a text file: 3 of 5 document\(s\) are not valid UTF-8 or "
        rf"binary \(NUL bytes\) or not JSON \(first at {path}:3\); a file is refused when more than half",
    ):
        load(str(path), tok)
    path.write_bytes(b"".join(good + bad[:2]))  # 2 of 4: a counted warning
    c = load(str(path), tok)
    assert c.stats.docs_with_replaced_bytes == 1 and c.stats.docs_with_nul == 1
    assert any("1 document(s) contain NUL bytes" in w for w in c.stats.warnings())
    # the rule is per file: a bad file is refused even inside a large clean corpus
    (tmp_path / "big.jsonl").write_text("".join('{"text": "clean row"}\n' for _ in range(100)))
    path.write_bytes(b"".join(good[:1] + bad))
    with pytest.raises(DataError, match="rows.jsonl: not a text file: 3 of 4"):
        load([str(tmp_path / "big.jsonl"), str(path)], tok)


def test_parquet_mostly_binary_is_refused(tmp_path: Path, tok: Any) -> None:
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["fine", "\x00\x01\x02", "\x00garbage", "x\x00"]}), path)
    with pytest.raises(
        DataError, match=rf"a.parquet: not a text file: 3 of 4 .*binary \(NUL bytes\) \(first at {path}:2\)"
    ):
        load(str(path), tok)


def test_lone_surrogate_escape(tmp_path: Path, tok: Any) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", ['{"text": "fox \\ud800 dog"}'])
    c = load(str(path), tok)
    assert c.stats.docs_with_replaced_bytes == 1
    assert c.tokens[-1] == tok.eos_token_id


def test_invalid_json_counted(tmp_path: Path, tok: Any) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "fox"}, "{not json", "", '{"text": "dog"', {"text": "dog"}])
    c = load(str(path), tok)
    assert c.tokens.tolist() == expected_stream(tok, ["fox", "dog"])
    assert c.stats.bad_json_rows == 2 and c.stats.first_bad_json == f"{path}:2"
    assert c.stats.rows_missing_field == 0
    assert any("invalid JSON" in w for w in c.stats.warnings())


def test_iter_documents(tmp_path: Path, tok: Any) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"text": "fox"}, {"nope": 1}, {"text": ""}, {"text": "dog"}])
    stats = CorpusStats()
    docs = list(iter_documents([str(tmp_path / "a.jsonl")], "text", tok, stats))
    assert docs == ["fox", "dog"]  # empty documents are dropped
    assert stats.documents == 2 and stats.rows_missing_field == 1 and stats.files == 1


# ---------------------------------------------------------------------------------------------------
# stream, packing, limits, fingerprint


def many_docs(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 25))) for _ in range(n)]


def test_eos_and_doc_start(tmp_path: Path, tok: Any) -> None:
    docs = many_docs(50)
    write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    c = load(str(tmp_path / "a.jsonl"), tok, max_seq_len=16)
    lens = [len(encode(tok, d)) + 1 for d in docs]
    starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
    assert np.flatnonzero(c.doc_start).tolist() == starts.tolist()
    ends = np.cumsum(lens) - 1
    assert (c.tokens[ends] == tok.eos_token_id).all()
    assert (c.tokens == tok.eos_token_id).sum() == len(docs)
    assert c.stats.documents == len(docs)


def test_truncation_configured_in_the_tokenizer_cuts_nothing(tmp_path: Path, tok: Any) -> None:
    """A tokenizer.json may carry truncation (or padding) settings; documents are still tokenized whole
    (the direct Rust path is taken only when the tokenizer has none)."""
    docs = many_docs(5)
    write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    want = expected_stream(tok, docs)
    truncating = build_tokenizer(tmp_path / "tok")
    truncating.backend_tokenizer.enable_truncation(max_length=3)
    assert load(str(tmp_path / "a.jsonl"), truncating).tokens.tolist() == want


def test_batches_join_correctly(tmp_path: Path, tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import selkd.cache.tokenizing as corpus

    docs = many_docs(40)
    write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    whole = load(str(tmp_path / "a.jsonl"), tok)
    monkeypatch.setattr(corpus, "_BATCH_DOCS", 3)
    split = load(str(tmp_path / "a.jsonl"), tok)
    assert np.array_equal(whole.tokens, split.tokens)
    assert np.array_equal(whole.doc_start, split.doc_start)
    assert whole.fingerprint == split.fingerprint


@pytest.mark.parametrize(("n_tokens", "seq_len", "n_seq", "last_len"), [(20, 8, 3, 4), (17, 8, 2, 8), (18, 8, 3, 2)])
def test_packing(n_tokens: int, seq_len: int, n_seq: int, last_len: int) -> None:
    tokens = np.arange(n_tokens, dtype=np.int32)
    c = PackedCorpus(tokens, np.zeros(n_tokens, bool), seq_len, "x", CorpusStats())
    assert c.n_sequences == n_seq
    assert [len(c.sequence(i)) for i in range(n_seq)] == [seq_len] * (n_seq - 1) + [last_len]
    assert c.sequence_bounds(1) == (seq_len, 2 * seq_len)
    assert c.sequence(-1).tolist() == tokens[(n_seq - 1) * seq_len : (n_seq - 1) * seq_len + last_len].tolist()
    assert np.shares_memory(c.sequence(0), c.tokens)
    got = c.sequences(np.array([n_seq - 1, 0]))
    assert [g.tolist() for g in got] == [c.sequence(n_seq - 1).tolist(), c.sequence(0).tolist()]
    mask = np.zeros(n_seq, bool)
    mask[0] = True
    assert [g.tolist() for g in c.sequences(mask)] == [c.sequence(0).tolist()]
    with pytest.raises(IndexError):
        c.sequence(n_seq)


def test_packing_real_corpus(tmp_path: Path, tok: Any) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in many_docs(30)])
    c = load(str(tmp_path / "a.jsonl"), tok, max_seq_len=32)
    n = len(c.tokens)
    assert c.n_sequences == n // 32 + (n % 32 >= 2)
    joined = np.concatenate([c.sequence(i) for i in range(c.n_sequences)])
    assert joined.tolist() == c.tokens[: len(joined)].tolist()


def test_limit_tokens_exact(tmp_path: Path, tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import selkd.cache.tokenizing as corpus

    monkeypatch.setattr(corpus, "_BATCH_DOCS", 2)
    for i in range(5):
        write_jsonl(tmp_path / f"f{i}.jsonl", [{"text": d} for d in many_docs(10, seed=i)])
    full = load(str(tmp_path), tok, max_seq_len=16)
    c = load(str(tmp_path), tok, max_seq_len=16, limit_tokens=37)
    assert len(c.tokens) == 37 and len(c.doc_start) == 37
    assert c.tokens.tolist() == full.tokens[:37].tolist()
    assert c.doc_start.tolist() == full.doc_start[:37].tolist()
    assert c.stats.documents == int(full.doc_start[:37].sum())
    assert c.stats.files == 1  # stopped reading once the cap was reached
    assert c.n_sequences == 3 and len(c.sequence(2)) == 5


def test_fingerprint(tmp_path: Path, tok: Any) -> None:
    (tmp_path / "a.txt").write_text("quick brown fox")
    (tmp_path / "b.txt").write_text("quick brown dog")
    a1 = load(str(tmp_path / "a.txt"), tok)
    a2 = load(str(tmp_path / "a.txt"), tok)
    assert a1.fingerprint == a2.fingerprint and len(a1.fingerprint) == 64
    assert load(str(tmp_path / "b.txt"), tok).fingerprint != a1.fingerprint
    assert load(str(tmp_path / "a.txt"), tok, max_seq_len=4).fingerprint != a1.fingerprint


# ---------------------------------------------------------------------------------------------------
# eval_mask


def test_eval_mask() -> None:
    m = eval_mask(100, 0.1, seed=3)
    assert m.dtype == np.bool_ and m.shape == (100,) and m.sum() == 10
    assert np.array_equal(m, eval_mask(100, 0.1, seed=3))
    assert not np.array_equal(m, eval_mask(100, 0.1, seed=4))
    assert (eval_mask(100, 0.1, seed=3) <= eval_mask(100, 0.3, seed=3)).all()  # nested
    assert eval_mask(7, 0.5).sum() == round(3.5)
    assert eval_mask(10, 0.0).sum() == 0
    assert eval_mask(10, 0.001).sum() == 1  # at least one
    assert eval_mask(2, 0.9).sum() == 1  # never all of them
    assert eval_mask(1, 0.5).sum() == 0
    assert eval_mask(0, 0.5).shape == (0,)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError):
            eval_mask(10, bad)


# ---------------------------------------------------------------------------------------------------
# errors


def test_error_missing_path(tmp_path: Path, tok: Any) -> None:
    path = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        load(path, tok)


def test_error_glob_matches_nothing(tmp_path: Path, tok: Any) -> None:
    with pytest.raises(DataError, match=r"\*\.jsonl.*matches nothing"):
        load(str(tmp_path / "*.jsonl"), tok)
    (tmp_path / "a.md").write_text("x")
    with pytest.raises(DataError, match=r"\*\.md.*no supported files"):
        load(str(tmp_path / "*.md"), tok)


def test_error_empty_directory(tmp_path: Path, tok: Any) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.md").write_text("x")
    with pytest.raises(DataError, match=r"d: directory has no supported files"):
        load(str(tmp_path / "d"), tok)


def test_error_unsupported_extension(tmp_path: Path, tok: Any) -> None:
    (tmp_path / "a.csv").write_text("text\nfox\n")
    with pytest.raises(DataError, match=r"a\.csv: unsupported file type"):
        load(str(tmp_path / "a.csv"), tok)


def test_error_unreadable(tmp_path: Path, tok: Any) -> None:
    (tmp_path / "bad.jsonl.gz").write_bytes(b"this is not gzip")
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz: cannot read"):
        load(str(tmp_path / "bad.jsonl.gz"), tok)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet: cannot read"):
        load(str(tmp_path / "bad.parquet"), tok)
    if os.name == "posix" and os.geteuid() != 0:  # root reads through chmod 000
        locked = tmp_path / "locked.txt"
        locked.write_text("fox")
        locked.chmod(0)
        with pytest.raises(DataError, match=r"locked\.txt: cannot read"):
            load(str(locked), tok)


def test_error_empty_corpus(tmp_path: Path, tok: Any) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"empty\.txt: the corpus is empty"):
        load(str(tmp_path / "empty.txt"), tok)
    path = write_jsonl(tmp_path / "nofield.jsonl", [{"body": "fox"}])
    with pytest.raises(DataError, match=r"nofield\.jsonl.*empty.*without a 'text' field"):
        load(str(path), tok)


def test_error_no_specs(tok: Any) -> None:
    with pytest.raises(DataError, match="no data given"):
        load([], tok)
    with pytest.raises(DataError, match="empty data spec"):
        load([""], tok)


def test_error_no_eos(tmp_path: Path) -> None:
    tok = build_tokenizer(tmp_path / "tok")
    tok.eos_token = None
    (tmp_path / "a.txt").write_text("fox")
    with pytest.raises(DataError, match="no EOS token"):
        load(str(tmp_path / "a.txt"), tok)


def test_bad_arguments(tmp_path: Path, tok: Any) -> None:
    (tmp_path / "a.txt").write_text("fox dog")
    with pytest.raises(ValueError, match="max_seq_len"):
        load(str(tmp_path / "a.txt"), tok, max_seq_len=1)
    with pytest.raises(ValueError, match="limit_tokens"):
        load(str(tmp_path / "a.txt"), tok, limit_tokens=1)


def test_error_messages_are_one_line(tmp_path: Path, tok: Any) -> None:
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage\nmore\n")
    with pytest.raises(DataError) as info:
        load(str(bad), tok)
    assert "\n" not in str(info.value) and str(bad) in str(info.value)


def test_progress_bar_to_stderr(tmp_path: Path, tok: Any, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.txt").write_text("fox dog")
    load_corpus(str(tmp_path / "a.txt"), tok, progress=True)
    captured = capsys.readouterr()
    assert "tokenizing" in captured.err and captured.out == ""
    load_corpus(str(tmp_path / "a.txt"), tok, progress=False)
    assert capsys.readouterr().err == ""

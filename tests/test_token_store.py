"""The corpus stage: `selkd-cache prepare` writes a token store that build and online training read.

- the stream is the same whatever the number of workers, ranks or shard size, and equals what
  ``load_corpus`` packs; sequences that span shards read back exactly;
- ``--limit-tokens`` cuts the stream exactly and leaves later units untokenized;
- a rerun skips committed units, refuses other settings, changed data and foreign stores;
- data sources: parquet row groups and save_to_disk shards as units, ``datasets:`` directories and
  packaged builders read offline, s3:// data and token stores on a real (moto) S3 server;
- a cache built from a token store equals one built with --data, also with 2 builder ranks.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import faults  # tools/faults.py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selkd.cache import open_cache
from selkd.cache import prepare as prepare_module
from selkd.cache.build import build_cache
from selkd.cache.cli import main as cache_main
from selkd.cache.config import BuildConfig, PrepareConfig
from selkd.cache.corpus import PackedCorpus, load_corpus
from selkd.cache.errors import DataError
from selkd.cache.info import cache_info
from selkd.cache.prepare import prepare_tokens
from selkd.cache.sources import resolve_specs
from selkd.cache.store import Storage
from selkd.cache.teacher import load_tokenizer
from selkd.cache.tokens import (
    SUMMARY_KEY,
    UNIT_COMMITS_PREFIX,
    TokenStore,
    TokenStoreError,
    unit_commit_key,
)
from selkd.cache.units import plan_units

SEQ = 64


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir: Path) -> Any:
    return load_tokenizer(str(tiny_tokenizer_dir))


def prepare(data: list[str], out: Path | str, tok: Any, tok_dir: Path, **kw: Any) -> TokenStore:
    rank, world = kw.pop("rank", 0), kw.pop("world", 1)
    cfg = PrepareConfig(data=data, tokenizer=str(tok_dir), out=str(out), progress=False, **kw)
    return prepare_tokens(cfg, tok, rank, world)


def assert_same_stream(packed: Any, reference: PackedCorpus) -> None:
    """Every sequence (tokens and document starts) of ``packed`` equals the in-memory reference."""
    assert packed.n_tokens == reference.n_tokens and packed.n_sequences == reference.n_sequences
    assert packed.fingerprint == reference.fingerprint
    tokens, docs = packed.read(np.arange(packed.n_sequences))
    np.testing.assert_array_equal(np.concatenate(tokens), reference.tokens[: sum(map(len, tokens))])
    np.testing.assert_array_equal(np.concatenate(docs), reference.doc_start[: sum(map(len, docs))])


_THREADS_PROBE = """
import os, sys
from tokenizers import Tokenizer, models, pre_tokenizers
from selkd.cache.tokenize_units import limit_tokenizer_threads
limit_tokenizer_threads(int(sys.argv[1]))
def threads():
    return int(open("/proc/self/status").read().split("Threads:")[1].split()[0])
before = threads()
tok = Tokenizer(models.BPE()); tok.pre_tokenizer = pre_tokenizers.ByteLevel()
tok.encode_batch(["some text to split"] * 20000)
print(os.environ["RAYON_NUM_THREADS"], threads() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="counts threads in /proc")
@pytest.mark.parametrize(("user", "asked", "expected"), [(None, 1, "1"), (None, 3, "3"), ("2", 1, "2")])
def test_worker_tokenizer_pool_sized_to_its_share(user: str | None, asked: int, expected: str) -> None:
    """A worker's tokenizer pool starts exactly the threads it is given (its share of the cores, so W
    workers do not run W pools of one thread per core), unless the user set RAYON_NUM_THREADS."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
    if user is not None:
        env["RAYON_NUM_THREADS"] = user
    run = subprocess.run([sys.executable, "-c", _THREADS_PROBE, str(asked)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    setting, started = run.stdout.split()
    assert setting == expected
    assert int(started) == (0 if expected == "1" else int(expected))  # one thread: the caller's own


def test_stream_independent_of_workers_ranks_and_shards(
    tmp_path: Path, tok: Any, tiny_tokenizer_dir: Path, text_corpus_dir: Path
) -> None:
    """1 worker, 2 forked workers and 2 ranks (threads here) with small shards all give the stream
    load_corpus packs; sequences spanning two shards read back exactly, in any order asked."""
    data = [str(text_corpus_dir)]
    reference = load_corpus(data, tok, SEQ, progress=False)
    one = prepare(data, tmp_path / "one", tok, tiny_tokenizer_dir)
    two = prepare(data, tmp_path / "two", tok, tiny_tokenizer_dir, workers=2, shard_tokens=1024)
    ranks: dict[int, TokenStore] = {}

    def rank(r: int) -> None:
        ranks[r] = prepare(data, tmp_path / "ranks", tok, tiny_tokenizer_dir, rank=r, world=2, shard_tokens=4096)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(one.shards) == 3 and len(two.shards) > 3 * 10  # one shard per file / many small ones
    for store in (one, two, ranks[0], ranks[1]):
        assert store.summary["content_sha256"] == one.summary["content_sha256"]
        assert store.stats == reference.stats
        assert_same_stream(store.packed(SEQ), reference)
    # reopened from disk, read in any order, with duplicates and a bool mask
    packed = TokenStore.open(str(tmp_path / "two")).packed(SEQ)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, packed.n_sequences, size=50)
    idx[:3] = [5, 5, -1]
    tokens, docs = packed.read(idx)
    for i, t, d in zip(idx, tokens, docs):
        np.testing.assert_array_equal(t, reference.sequence(int(i)))
        np.testing.assert_array_equal(d, reference.sequence_doc_start(int(i)))
    mask = np.zeros(packed.n_sequences, bool)
    mask[[0, 7]] = True
    assert [s.tolist() for s in packed.sequences(mask)] == [
        reference.sequence(0).tolist(),
        reference.sequence(7).tolist(),
    ]
    # the fingerprint is that of the packed view: another sequence length, another fingerprint
    assert TokenStore.open(str(tmp_path / "two")).packed(SEQ + 1).fingerprint != packed.fingerprint


def test_limit_tokens_cuts_and_skips_later_units(
    tmp_path: Path, tok: Any, tiny_tokenizer_dir: Path, text_corpus_dir: Path
) -> None:
    data = [str(text_corpus_dir)]
    first_unit = json.loads(Path(text_corpus_dir / "part-00.jsonl").read_text().splitlines()[0])["text"]
    limit = len(tok(first_unit, add_special_tokens=False)["input_ids"]) + 100  # inside the first file
    store = prepare(data, tmp_path / "t", tok, tiny_tokenizer_dir, limit_tokens=limit, shard_tokens=1024)
    assert store.n_tokens == limit
    assert_same_stream(store.packed(SEQ), load_corpus(data, tok, SEQ, limit_tokens=limit, progress=False))
    committed = sorted(os.listdir(tmp_path / "t" / UNIT_COMMITS_PREFIX))
    assert committed == ["unit-000000.json"]  # the later files were never read
    assert store.stats.files == 1


def test_rerun_resumes_and_refuses_other_settings(
    tmp_path: Path, tok: Any, tiny_tokenizer_dir: Path, text_corpus_dir: Path, other_tokenizer_model_dir: Path
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for f in sorted(text_corpus_dir.iterdir()):
        (data_dir / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "t"
    first = prepare([str(data_dir)], out, tok, tiny_tokenizer_dir)
    # a killed run: one unit and the summary are not committed; the rerun redoes only that unit
    (out / unit_commit_key(1)).unlink()
    (out / SUMMARY_KEY).unlink()
    with pytest.raises(TokenStoreError, match="the token store is not finished.*rerun its `selkd-cache prepare`"):
        TokenStore.open(str(out))
    kept = {u: (out / unit_commit_key(u)).stat().st_mtime_ns for u in (0, 2)}
    again = prepare([str(data_dir)], out, tok, tiny_tokenizer_dir)
    assert again.summary == first.summary
    assert {u: (out / unit_commit_key(u)).stat().st_mtime_ns for u in (0, 2)} == kept
    assert (out / unit_commit_key(1)).exists()
    with pytest.raises(TokenStoreError, match=r"(?s)other settings.*--text-field: 'text' -> 'body'"):
        prepare([str(data_dir)], out, tok, tiny_tokenizer_dir, text_field="body")
    other = load_tokenizer(str(other_tokenizer_model_dir))
    with pytest.raises(TokenStoreError, match=r"(?s)tokenizer: .* \(fingerprints differ\)"):
        prepare([str(data_dir)], out, other, other_tokenizer_model_dir)
    (data_dir / "part-03.jsonl").write_text('{"text": "a new file"}\n')
    with pytest.raises(TokenStoreError, match=r"the data changed since the token store was prepared \(1 source"):
        prepare([str(data_dir)], out, tok, tiny_tokenizer_dir)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(TokenStoreError, match="holds files that are not a selkd token store"):
        prepare([str(data_dir)], foreign, tok, tiny_tokenizer_dir)
    assert sorted(os.listdir(foreign)) == ["notes.txt"]


def test_a_second_preparer_joins_a_store_created_after_its_first_look(
    tmp_path: Path, tok: Any, tiny_tokenizer_dir: Path, text_corpus_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two rank-0 preparers of one store (two builds of one --out): the second looks (no header yet),
    the first then creates and fills the store, and the second, finding files, joins it. It failed
    once in CI with "holds files that are not a selkd token store"; here the interleaving is forced."""
    data, out = [str(text_corpus_dir)], tmp_path / "t"
    real_read_header = prepare_module.read_header
    first_look = True

    def look_then_let_the_other_preparer_run(storage: Storage) -> Any:
        nonlocal first_look
        header = real_read_header(storage)
        if first_look:
            first_look = False
            other.append(prepare(data, out, tok, tiny_tokenizer_dir))
        return header

    other: list[TokenStore] = []
    monkeypatch.setattr(prepare_module, "read_header", look_then_let_the_other_preparer_run)
    second = prepare(data, out, tok, tiny_tokenizer_dir)
    assert len(other) == 1 and second.summary == other[0].summary
    assert second.header == other[0].header
    assert_same_stream(second.packed(SEQ), load_corpus(data, tok, SEQ, progress=False))


def test_unreadable_data_leaves_nothing_behind(tmp_path: Path, tok: Any, tiny_tokenizer_dir: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="the corpus is empty"):
        prepare([str(tmp_path / "empty.txt")], tmp_path / "t", tok, tiny_tokenizer_dir)
    assert not (tmp_path / "t").exists()  # the directory prepare made is gone too
    (tmp_path / "mine").mkdir()  # one the user made stays, empty
    with pytest.raises(DataError, match="the corpus is empty"):
        prepare([str(tmp_path / "empty.txt")], tmp_path / "mine", tok, tiny_tokenizer_dir)
    assert os.listdir(tmp_path / "mine") == []
    with pytest.raises(TokenStoreError, match="not a selkd token store"):
        TokenStore.open(str(tmp_path / "mine"))


def test_parquet_row_groups_and_saved_dataset_shards_are_units(
    tmp_path: Path, tok: Any, tiny_tokenizer_dir: Path
) -> None:
    datasets = pytest.importorskip("datasets")
    docs = [f"row {i} of the quick brown fox" for i in range(7)]
    texts: list[str | None] = list(docs)
    texts[2] = None  # a row without text in the second row group: counted with its row in the file
    pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet", row_group_size=2)
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "ds"), num_shards=3)
    specs = [str(tmp_path / "a.parquet"), str(tmp_path / "ds")]
    units = plan_units(resolve_specs(specs))
    assert [(u.kind, u.part, u.first_row) for u in units] == [
        ("parquet", 0, 0), ("parquet", 1, 2), ("parquet", 2, 4), ("parquet", 3, 6),
        ("hf_dataset", 0, 0), ("hf_dataset", 1, 3), ("hf_dataset", 2, 5),
    ]  # fmt: skip
    store = prepare(specs, tmp_path / "t", tok, tiny_tokenizer_dir)
    expected = [d for i, d in enumerate(docs) if i != 2] + docs
    reference = load_corpus(specs, tok, SEQ, progress=False)
    assert_same_stream(store.packed(SEQ), reference)
    ids = [x for d in expected for x in [*tok(d, add_special_tokens=False)["input_ids"], tok.eos_token_id]]
    assert reference.tokens.tolist() == ids
    assert store.stats.rows_missing_field == 1 and store.stats.first_missing == f"{tmp_path / 'a.parquet'}:3"
    assert store.stats.files == 2


def test_datasets_directory_and_packaged_builder_offline(tmp_path: Path, tok: Any, tiny_tokenizer_dir: Path) -> None:
    """A dataset directory (as `huggingface-cli download` leaves it) and a packaged builder with data
    files, streamed by datasets.load_dataset from local files; one unit per data file."""
    pytest.importorskip("datasets")
    root = tmp_path / "repo"
    (root / "data").mkdir(parents=True)
    rows = {name: [f"{name} document {i} with a lazy dog" for i in range(4)] for name in ("train-0", "train-1")}
    for name, docs in rows.items():
        (root / "data" / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (root / "data" / "test-0.jsonl").write_text(json.dumps({"text": "held out"}) + "\n")
    spec = f"datasets:{root}?split=train"
    units = plan_units(resolve_specs([spec]))
    assert [(u.part, u.n_parts) for u in units] == [(0, 2), (1, 2)]
    store = prepare([spec], tmp_path / "t", tok, tiny_tokenizer_dir)
    expected = rows["train-0"] + rows["train-1"]
    tokens, _ = store.read(0, store.n_tokens)
    ids = [x for d in expected for x in [*tok(d, add_special_tokens=False)["input_ids"], tok.eos_token_id]]
    assert tokens.tolist() == ids
    builder = f"datasets:json?data_files={root / 'data' / 'train-*.jsonl'}"
    assert load_corpus([builder], tok, SEQ, progress=False).tokens.tolist() == ids
    with pytest.raises(DataError, match=r"has splits test, train; choose one with \?split=test"):
        load_corpus([f"datasets:{root}"], tok, SEQ, progress=False)
    with pytest.raises(DataError, match=r"unknown key\(s\) revision"):
        resolve_specs([f"datasets:{root}?revision=main"])
    with pytest.raises(DataError, match="neither a local directory nor a packaged builder.*offline"):
        resolve_specs(["datasets:HuggingFaceFW/fineweb"])
    with pytest.raises(DataError, match=r"needs \?data_files=GLOB"):
        resolve_specs(["datasets:json"])


def test_s3_data_and_token_store(tmp_path: Path, tok: Any, tiny_tokenizer_dir: Path, s3_endpoint: Any) -> None:
    """--data s3://... (a directory, a glob; jsonl, jsonl.gz and parquet streamed from the server) and
    --out s3://... give the stream of the same files read locally."""
    import gzip

    import s3fs

    docs = [f"document {i}: the teacher and the student share one cache" for i in range(30)]
    local = tmp_path / "corpus"
    (local / "sub").mkdir(parents=True)
    (local / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:10]))
    (local / "sub" / "b.jsonl.gz").write_bytes(
        gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in docs[10:20]).encode())
    )
    pq.write_table(pa.table({"text": docs[20:]}), local / "c.parquet", row_group_size=4)
    (local / ".hidden.jsonl").write_text('{"text": "never read"}\n')
    fs = s3fs.S3FileSystem(**s3_endpoint.storage_options)
    remote = s3_endpoint.url("prep/corpus")
    fs.put(str(local) + "/", remote.removeprefix("s3://") + "/", recursive=True)
    reference = load_corpus([str(local)], tok, SEQ, progress=False)
    options = s3_endpoint.storage_options
    store = prepare([remote + "/"], s3_endpoint.url("prep/tokens"), tok, tiny_tokenizer_dir, storage_option=options)
    assert_same_stream(TokenStore.open(s3_endpoint.url("prep/tokens"), options).packed(SEQ), reference)
    assert store.stats.files == 3
    # the same options serve the data; a local store takes none
    local_store = prepare([remote], tmp_path / "local", tok, tiny_tokenizer_dir, storage_option=options)
    assert local_store.summary == store.summary
    globbed = resolve_specs([remote + "/*.jsonl", remote + "/**/*.gz"], options)
    assert [str(s.path) for s in globbed] == [f"{remote}/a.jsonl", f"{remote}/sub/b.jsonl.gz"]
    with pytest.raises(DataError, match="no such file or directory"):
        resolve_specs([s3_endpoint.url("prep/nothing-here")], options)
    with pytest.raises(DataError, match="the pattern matches nothing"):
        resolve_specs([remote + "/*.txt"], options)
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    fs.put(str(tmp_path / "saved") + "/", s3_endpoint.url("prep/saved/ds").removeprefix("s3://") + "/", recursive=True)
    with pytest.raises(
        DataError, match=r"prep/saved/ds is a directory saved by datasets.save_to_disk.*local disk only"
    ):
        resolve_specs([s3_endpoint.url("prep/saved")], options)


def test_s3_data_through_the_aws_environment(tmp_path: Path, tok: Any, aws_env: Any, capsys: Any) -> None:
    """`selkd-cache prepare --data s3://...` with only the standard AWS variables, then `info`."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=aws_env.endpoint_url)
    fs.pipe(aws_env.url("env/corpus/a.jsonl").removeprefix("s3://"), b'{"text": "quick brown fox"}\n')
    out = aws_env.url("env/tokens")
    tokenizer_dir = tok.name_or_path
    assert cache_main(["prepare", "--data", aws_env.url("env/corpus"), "--tokenizer", tokenizer_dir, "--out", out]) == 0
    assert cache_main(["info", out]) == 0
    shown = capsys.readouterr().out
    assert "selkd-tokens v1" in shown and aws_env.url("env/corpus") in shown


def test_build_from_token_store_equals_build_from_data(
    tmp_path: Path, tok: Any, tiny_teacher_dir: Path, tiny_tokenizer_dir: Path, text_corpus_dir: Path,
    other_tokenizer_model_dir: Path, capsys: Any,
) -> None:  # fmt: skip
    """The cache of `build --tokens` (prepared by 2 workers in small shards) equals, array for array,
    the cache of `build --data`, also when 2 builder ranks write it; the stream is load_corpus's."""
    common = dict(classes="topk:4", max_seq_len=SEQ, part_tokens=1024, eval_fraction=0.05, batch_size=4,
                  progress=False, device="cpu")  # fmt: skip
    limit = 6000
    build_cache(BuildConfig(teacher=str(tiny_teacher_dir), data=[str(text_corpus_dir)], out=str(tmp_path / "a"),
                            limit_tokens=limit, **common))  # fmt: skip
    tokens = tmp_path / "tokens"
    argv = ["prepare", "--data", str(text_corpus_dir), "--tokenizer", str(tiny_teacher_dir), "--out", str(tokens),
            "--limit-tokens", str(limit), "--workers", "2", "--shard-tokens", "1024", "--no-progress"]  # fmt: skip
    assert cache_main(argv) == 0
    for rank in (0, 1):
        build_cache(BuildConfig(teacher=str(tiny_teacher_dir), tokens=str(tokens), out=str(tmp_path / "b"),
                                rank=rank, world_size=2, **common))  # fmt: skip
    digest = faults.cache_digest(tmp_path / "a")
    assert digest and faults.cache_digest(tmp_path / "b") == digest
    # info counts the cache, not the token store build --data keeps in it
    sizes = [cache_info(open_cache(str(tmp_path / name))).bytes_on_disk for name in ("a", "b")]
    tokens_bytes = Storage.open(str(tmp_path / "a" / "tokens")).size_bytes("")
    assert abs(sizes[0] - sizes[1]) < 1000 < tokens_bytes
    header = json.loads((tmp_path / "b" / "zarr.json").read_text())["attributes"]["selkd"]
    reference = load_corpus([str(text_corpus_dir)], tok, SEQ, limit_tokens=limit, progress=False)
    assert header["data"]["fingerprint"] == reference.fingerprint and header["data"]["fingerprint_version"] == 2
    assert header["data"]["specs"] == [str(text_corpus_dir)] and header["data"]["tokens"] == str(tokens)
    # a rerun of build --data reuses its token store (no unit is tokenized again)
    records = tmp_path / "a" / "tokens" / UNIT_COMMITS_PREFIX
    before = {p.name: p.stat().st_mtime_ns for p in records.iterdir()}
    build_cache(BuildConfig(teacher=str(tiny_teacher_dir), data=[str(text_corpus_dir)], out=str(tmp_path / "a"),
                            limit_tokens=limit, **common))  # fmt: skip
    assert {p.name: p.stat().st_mtime_ns for p in records.iterdir()} == before
    # a token store of another tokenizer is refused, one line, exit 1
    capsys.readouterr()
    code = cache_main(["build", "--teacher", str(other_tokenizer_model_dir), "--tokens", str(tokens), "--out",
                       str(tmp_path / "c"), "--device", "cpu", "--no-progress"])  # fmt: skip
    last = capsys.readouterr().err.splitlines()[-1]  # after transformers' own "Loading weights" bar
    assert code == 1 and last.startswith("selkd-cache: error: ") and "holds ids of another tokenizer" in last


def test_build_resumes_an_interrupted_prepare(
    tmp_path: Path, tok: Any, tiny_teacher_dir: Path, tiny_tokenizer_dir: Path, text_corpus_dir: Path
) -> None:
    """A build stopped while tokenizing leaves only STORE/tokens: the rerun accepts that --out and
    finishes the token store instead of calling it foreign."""
    out = tmp_path / "cache"
    prepare([str(text_corpus_dir)], out / "tokens", tok, tiny_teacher_dir, limit_tokens=3000)
    (out / "tokens" / SUMMARY_KEY).unlink()
    build_cache(BuildConfig(teacher=str(tiny_teacher_dir), data=[str(text_corpus_dir)], out=str(out),
                            limit_tokens=3000, classes="topk:4", max_seq_len=SEQ, part_tokens=1024,
                            progress=False, device="cpu"))  # fmt: skip
    assert (out / "tokens" / SUMMARY_KEY).exists() and (out / "zarr.json").exists()

"""selkd-cache build / info / verify / reader: exactness, resumability, ranks and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from selkd.cache import format as fmt
from selkd.cache import open_cache
from selkd.cache.build import build_cache
from selkd.cache.cli import main as cli_main
from selkd.cache.config import BuildConfig
from selkd.cache.corpus import load_corpus
from selkd.cache.doc_attention import attention_inputs
from selkd.cache.errors import BuildError
from selkd.cache.options import ConfigError
from selkd.cache.teacher import load_causal_lm, load_tokenizer
from selkd.cache.writer import PartWriter

SEQ = 64


def cfg(teacher: Path, data: Path, out: Path, **kw: object) -> BuildConfig:
    base: dict[str, object] = dict(
        teacher=str(teacher),
        data=[str(data)],
        out=str(out),
        classes="sample:16",
        max_seq_len=SEQ,
        part_tokens=1024,
        limit_tokens=12_000,
        eval_fraction=0.05,
        progress=False,
        device="cpu",
        batch_size=4,
    )
    base.update(kw)
    return BuildConfig(**base)  # type: ignore[arg-type]


def store_digest(path: Path) -> dict[str, str]:
    """Checksums of every committed part's arrays: equal digests mean equal caches."""
    out = {}
    for rec in sorted((path / fmt.COMMITS_PREFIX).glob("*.json")):
        data = json.loads(rec.read_text())
        out[data["part"]] = json.dumps(data["arrays"], sort_keys=True)
    return out


@pytest.fixture(scope="module")
def teacher_logits(tiny_teacher_dir: Path, text_corpus_dir: Path):
    """Direct forward of the teacher over every sequence: the ground truth for round trips."""
    tok = load_tokenizer(str(tiny_teacher_dir))
    model = load_causal_lm(str(tiny_teacher_dir), torch.device("cpu"), torch.float32)
    corpus = load_corpus([str(text_corpus_dir)], tok, SEQ, limit_tokens=12_000, progress=False)

    def logits_of(seq_index: int) -> torch.Tensor:
        x = torch.from_numpy(corpus.sequence(seq_index).astype(np.int64))[None]
        starts = torch.from_numpy(corpus.sequence_doc_start(seq_index))[None]
        with torch.no_grad():  # each packed document attends only to itself (--doc-attention, the default)
            return model(input_ids=x, **attention_inputs(starts, None, True)).logits[0, :-1].float()

    return corpus, logits_of


@pytest.mark.parametrize("classes", ["topk:8", "full", "sample:16"])
def test_round_trip_matches_direct_forward(tmp_path, tiny_teacher_dir, text_corpus_dir, teacher_logits, classes):
    corpus, logits_of = teacher_logits
    build_cache(cfg(tiny_teacher_dir, text_corpus_dir, tmp_path / "c", classes=classes))
    reader = open_cache(str(tmp_path / "c"))
    assert reader.num_sequences("train") + reader.num_sequences("eval") == corpus.n_sequences
    for i in (0, 3, reader.num_sequences("train") - 1):
        seq = reader.get(i)
        np.testing.assert_array_equal(seq.input_ids, corpus.sequence(seq.seq_index))
        logits = logits_of(seq.seq_index)
        logp = torch.log_softmax(logits, -1)
        ent = -(logp.exp() * logp).sum(-1)
        nxt = torch.from_numpy(seq.input_ids[1:].astype(np.int64))
        np.testing.assert_allclose(seq.teacher_entropy, ent.numpy(), atol=5e-3, rtol=2e-3)
        np.testing.assert_allclose(seq.teacher_logprob, logp.gather(-1, nxt[:, None])[:, 0].numpy(), atol=1e-2)
        t = seq.targets
        if classes == "full":
            assert torch.allclose(t.logprobs, logp, atol=1e-2)
        elif classes == "topk:8":
            vals, ids = torch.topk(logp, 8, -1)
            assert torch.equal(t.ids, ids)
            assert (t.logprobs - vals).abs().max() <= 0.01
            tail = torch.log1p(-vals.exp().sum(-1).clamp(max=1 - 1e-7))
            assert torch.allclose(t.tail_logmass, tail, atol=2e-2)
        else:
            counts = t.counts()
            assert (counts.sum(-1) == 16).all()
            assert (logp.gather(-1, t.ids)[counts > 0] > -30).all()  # only classes the teacher can emit
        # random access equals the part-wise read
        whole = next(s for s in reader.iter_sequences("train") if s.seq_index == seq.seq_index)
        assert torch.equal(whole.targets.logprobs, seq.targets.logprobs)


def test_sampled_targets_are_unbiased():
    torch.manual_seed(0)
    logits = torch.randn(1, 30) * 2
    p = torch.softmax(logits, -1)[0]
    from selkd.cache.classes import ClassSpec, teacher_outputs

    g = torch.Generator().manual_seed(1)
    draws, n = 4000, 10
    acc = torch.zeros(30)
    for _ in range(draws // 100):
        out = teacher_outputs(
            logits.repeat(100, 1), torch.zeros(100, dtype=torch.long), ClassSpec("sample", n), generator=g
        )
        acc.scatter_add_(0, out.targets.ids.reshape(-1), out.targets.probs().reshape(-1))
    est = acc / draws
    # each estimate is a mean of `draws` values count/N with variance p(1-p)/N
    se = (p * (1 - p) / n / draws).sqrt()
    assert ((est - p).abs() <= 5 * se + 1e-6).all(), (est - p).abs().max()


def test_big_vocab_ids_round_trip(tmp_path, qwen_like_teacher_dir, text_corpus_dir):
    """C = 151,665 classes > 2^17: ids above 131,072 must survive exactly (the reference code aliases them);
    the head's 271 padded rows (151,936 in all, as Qwen2.5-0.5B's) are never targets."""
    out = tmp_path / "big"
    build_cache(cfg(qwen_like_teacher_dir, text_corpus_dir, out, classes="topk:64", limit_tokens=600, temperature=8.0))
    reader = open_cache(str(out))
    classes = len(load_tokenizer(str(qwen_like_teacher_dir)))
    assert (reader.vocab_size, reader.num_classes, classes) == (151_936, 151_665, 151_665)
    model = load_causal_lm(str(qwen_like_teacher_dir), torch.device("cpu"), torch.float32)
    seq = reader.get(0)
    with torch.no_grad():
        x, starts = torch.from_numpy(seq.input_ids.astype(np.int64))[None], torch.from_numpy(seq.doc_start)[None]
        logits = model(input_ids=x, **attention_inputs(starts, None, True)).logits[0, :-1]
    ids = torch.topk(torch.log_softmax(logits[:, :classes] / 8.0, -1), 64, -1).indices
    assert torch.equal(seq.targets.ids, ids)
    assert int(seq.targets.ids.max()) >= 1 << 17
    # sample mode: the delta coding must also round-trip high ids
    out2 = tmp_path / "big-sample"
    build_cache(
        cfg(qwen_like_teacher_dir, text_corpus_dir, out2, classes="sample:50", limit_tokens=600, temperature=8.0)
    )
    s = open_cache(str(out2)).get(0)
    assert int(s.targets.ids.max()) >= 1 << 17
    assert int(s.targets.ids.max()) < classes
    assert cli_main(["verify", str(out2)]) == 0


def test_failure_mid_part_then_rerun_equals_uninterrupted(tmp_path, tiny_teacher_dir, text_corpus_dir, monkeypatch):
    ref = tmp_path / "ref"
    build_cache(cfg(tiny_teacher_dir, text_corpus_dir, ref))
    out = tmp_path / "out"
    calls = {"n": 0}
    original = PartWriter.add

    def failing_add(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20:  # one call per sequence: in the middle of the second part
            raise RuntimeError("injected failure")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PartWriter, "add", failing_add)
    with pytest.raises(RuntimeError, match="injected"):
        build_cache(cfg(tiny_teacher_dir, text_corpus_dir, out))
    monkeypatch.setattr(PartWriter, "add", original)
    partial = open_cache(str(out), require_complete=False)
    assert partial.missing_parts  # the failed part is not visible
    with pytest.raises(Exception, match="incomplete cache"):
        open_cache(str(out))
    result = build_cache(cfg(tiny_teacher_dir, text_corpus_dir, out))
    assert result.parts_skipped >= 1
    assert store_digest(out) == store_digest(ref)
    assert cli_main(["verify", str(out)]) == 0


def test_two_ranks_equal_one(tmp_path, tiny_teacher_dir, text_corpus_dir):
    one = tmp_path / "one"
    build_cache(cfg(tiny_teacher_dir, text_corpus_dir, one))
    two = tmp_path / "two"
    r0 = build_cache(cfg(tiny_teacher_dir, text_corpus_dir, two, rank=0, world_size=2))
    assert not r0.finalized
    assert open_cache(str(two), require_complete=False).missing_parts
    r1 = build_cache(cfg(tiny_teacher_dir, text_corpus_dir, two, rank=1, world_size=2))
    assert r1.finalized  # the last finisher finalises
    assert store_digest(two) == store_digest(one)
    assert open_cache(str(two)).summary is not None


def test_verify_catches_flipped_byte(tmp_path, tiny_teacher_dir, text_corpus_dir, capsys):
    out = tmp_path / "c"
    build_cache(cfg(tiny_teacher_dir, text_corpus_dir, out))
    assert cli_main(["verify", str(out)]) == 0
    shard = out / fmt.PARTS_GROUP / "part-00002" / "teacher_entropy" / "c" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x40
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli_main(["verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert "part-00002" in err and "teacher_entropy" in err
    reader = open_cache(str(out))
    with pytest.raises(Exception, match="part-00002.*teacher_entropy"):
        list(reader.iter_sequences(reader.parts[2].split))


def test_info_json_keys_and_values(tmp_path, tiny_teacher_dir, text_corpus_dir, capsys):
    out = tmp_path / "c"
    build_cache(cfg(tiny_teacher_dir, text_corpus_dir, out, classes="topk:8"))
    capsys.readouterr()
    assert cli_main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    keys = [
        "format",
        "format_version",
        "teacher",
        "tokenizer_fingerprint",
        "vocab_size",
        "classes",
        "temperature",
        "max_seq_len",
        "sequences_total",
        "sequences_stored",
        "sequences_eval",
        "positions_stored",
        "bytes_on_disk",
        "bytes_per_stored_position",
        "bytes_per_corpus_position",
        "mean_teacher_entropy",
        "mean_unique_ids",
        "mean_kept_mass",
        "parts_committed",
        "parts_incomplete",
    ]
    assert set(keys) <= set(info)
    assert info["format"] == "selkd-cache" and info["format_version"] == 2  # chunks carry a crc32c
    assert info["classes"] == "topk:8" and info["mean_unique_ids"] is None
    assert 0 < info["mean_kept_mass"] <= 1
    assert info["parts_incomplete"] == 0 and info["parts_committed"] >= 2
    assert info["bytes_per_stored_position"] == pytest.approx(info["bytes_on_disk"] / info["positions_stored"])
    assert cli_main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "topk:8" in text and "bytes/position" in text and "selkd-cache v2" in text


def test_sample_selection_keeps_top_scored(tmp_path, tiny_teacher_dir, tiny_student_dir, text_corpus_dir):
    out = tmp_path / "sel"
    build_cache(cfg(tiny_teacher_dir, text_corpus_dir, out, student=str(tiny_student_dir), sample_ratio=0.2))
    reader = open_cache(str(out))
    idx, scores = reader.scores()
    n_train = reader.header["data"]["n_sequences"] - reader.header["eval"]["n_sequences"]
    assert len(idx) == n_train  # every training sequence was scored, and all scores are kept
    kept = sorted(s.seq_index for s in reader.iter_sequences("train"))
    assert len(kept) == int(np.ceil(0.2 * n_train))
    threshold = np.sort(scores)[::-1][len(kept) - 1]
    assert all(scores[np.searchsorted(idx, k)] >= threshold for k in kept)
    # the scores are the frozen student's mean entropy
    from selkd.cache.scoring import mean_entropy

    student = load_causal_lm(str(tiny_student_dir), torch.device("cpu"), torch.float32)
    seq = reader.get(0)
    starts = torch.from_numpy(seq.doc_start)[None]  # each packed document attends only to itself
    direct = mean_entropy(student, torch.from_numpy(seq.input_ids.astype(np.int64))[None], starts)[0]
    assert direct.item() == pytest.approx(float(scores[np.searchsorted(idx, seq.seq_index)]), rel=1e-4)


def test_rerun_with_other_settings_is_refused(tmp_path, tiny_teacher_dir, text_corpus_dir):
    out = tmp_path / "c"
    build_cache(cfg(tiny_teacher_dir, text_corpus_dir, out))
    with pytest.raises(BuildError, match=r"--classes: 'sample:16' -> 'topk:4'"):
        build_cache(cfg(tiny_teacher_dir, text_corpus_dir, out, classes="topk:4"))
    again = build_cache(cfg(tiny_teacher_dir, text_corpus_dir, out))
    assert again.parts_written == 0 and again.parts_skipped > 0


# --- bad input: a clear message, a non-zero exit, nothing half-written -----------------------------


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = cli_main(args)
    return code, capsys.readouterr().err


def base_args(teacher: Path, data: Path | str, out: Path) -> list[str]:
    return [
        "build",
        "--teacher",
        str(teacher),
        "--data",
        str(data),
        "--out",
        str(out),
        "--max-seq-len",
        "64",
        "--limit-tokens",
        "3000",
        "--progress",
        "false",
        "--device",
        "cpu",
    ]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--classes", "sample:300"], "between 1 and 255"),
        (["--classes", "sample:0"], "between 1 and 255"),
        (["--classes", "topk:x"], "not a whole number"),
        (["--classes", "bogus"], "expected topk:K, sample:N or full"),
        (["--sample-ratio", "0"], "--sample-ratio must be > 0"),
        (["--sample-ratio", "1.5"], "--sample-ratio must be <= 1"),
        (["--sample-ratio", "0.5"], "needs --student"),
        (["--teacher-device-map", "everywhere"], "--teacher-device-map"),
        (["--teacher-device-map", "{not json"], "not valid JSON"),
        (["--head-chunk-tokens", "0"], "--head-chunk-tokens must be >= 1"),
    ],
)
def test_bad_options(tmp_path, tiny_teacher_dir, text_corpus_dir, capsys, extra, needle):
    code, err = run_cli(base_args(tiny_teacher_dir, text_corpus_dir, tmp_path / "o") + extra, capsys)
    assert code == 2 and needle in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["build"], "--teacher and --out are required"),
        (["build", "--teacher", "T", "--out", "O"], "give either --data SPEC [SPEC ...] or --tokens TOKENS"),
        (["build", "--teacher", "T", "--out", "O", "--data", "D", "--tokens", "X"], "give either --data"),
        (["build", "--teacher", "T", "--out", "O", "--tokens", "X", "--limit-tokens", "9"], "--limit-tokens: fixed"),
        (["build", "--data", "D", "--out", "O"], "--teacher is required"),
        (["build", "--teacher", "T", "--data", "D"], "--out is required"),
        (["build", "--teacher", "T", "--data"], "argument --data: expected at least one argument"),
        (["build", "--class", "topk:4"], "--class: unknown option; did you mean --classes?"),
        (["build", "--temp", "2"], "--temp: unknown option; did you mean --temperature?"),
        (["build", "--clases", "topk:4"], "--clases: unknown option; did you mean --classes?"),
        (
            ["build", "--teacher", "T", "--data", "D", "--out", "O", "--temperature", "-1e-4"],
            "--temperature must be > 0.0, got -0.0001",
        ),
        (
            ["build", "--teacher", "T", "--data", "D", "--out", "O", "--progress", "maybe"],
            "argument --progress: expected true or false, got 'maybe'",
        ),
        (["info", "--jsn", "STORE"], "--jsn: unknown option; did you mean --json?"),
        (["verify"], "the following arguments are required: STORE"),
        (["bogus"], "argument COMMAND: invalid choice: 'bogus' (choose from "),
    ],
)
def test_usage_errors_are_one_line_exit_2(args, message, capsys):
    """Like selkd-train: one line naming the flag, exit 2, no usage block, no traceback."""
    code, err = run_cli(args, capsys)
    assert code == 2 and err.startswith(f"selkd-cache: error: {message}") and err.count("\n") == 1


def test_boolean_flags_and_help(capsys):
    from selkd.cache.cli import make_parser
    from selkd.cache.options import from_args

    required = ["build", "--teacher", "T", "--data", "D", "--out", "O"]
    for extra, progress in (([], True), (["--no-progress"], False), (["--progress", "false"], False)):
        assert from_args(BuildConfig, make_parser().parse_args(required + extra)).progress is progress
    with pytest.raises(SystemExit) as exc:
        cli_main(["build", "--help"])
    assert exc.value.code == 0 and "--classes MODE" in capsys.readouterr().out


def test_config_file_syntax_error(tmp_path, capsys):
    conf = tmp_path / "build.yaml"
    conf.write_text("teacher: t\ndata: [a\nout: o\n")
    code, err = run_cli(["build", "--config", str(conf)], capsys)
    assert code == 2 and err.startswith(f"selkd-cache: error: --config {conf}: invalid YAML at line 3, column ")
    assert err.count("\n") == 1


def test_txt_of_random_bytes_is_refused(tmp_path, tiny_teacher_dir, capsys):
    """A .txt of random bytes used to give one warning and a cache of U+FFFD tokens (exit 0)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "good.txt").write_text("def f(x):\n    return x + 1\n" * 50)
    (data / "noise.txt").write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    out = tmp_path / "o"
    code, err = run_cli(base_args(tiny_teacher_dir, data, out), capsys)
    last = err.splitlines()[-1]  # after the teacher's loading bar
    assert code == 1 and "Traceback" not in err and "warning" not in err
    assert last.startswith(f"selkd-cache: error: {data / 'noise.txt'}: not a text file: 1 of 1 document(s) are not")
    assert not out.exists() or not any(out.iterdir())


def test_bad_inputs(tmp_path, tiny_teacher_dir, other_tokenizer_model_dir, bert_dir, text_corpus_dir, capsys):
    out = tmp_path / "o"
    code, err = run_cli(base_args(tiny_teacher_dir, tmp_path / "missing.jsonl", out), capsys)
    assert code == 1 and "missing.jsonl" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, err = run_cli(base_args(tiny_teacher_dir, empty, out), capsys)
    assert code == 1 and "empty.jsonl" in err
    code, err = run_cli(base_args(bert_dir, text_corpus_dir, out), capsys)
    assert code == 1 and "not a causal language model" in err
    code, err = run_cli(base_args(tiny_teacher_dir, text_corpus_dir, out) + ["--classes", "topk:100000"], capsys)
    assert code == 1 and "larger than the teacher's vocabulary" in err
    code, err = run_cli(
        base_args(tiny_teacher_dir, text_corpus_dir, out)
        + ["--student", str(other_tokenizer_model_dir), "--sample-ratio", "0.5"],
        capsys,
    )
    assert code == 1 and "another tokenizer" in err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, err = run_cli(base_args(tiny_teacher_dir, text_corpus_dir, foreign), capsys)
    assert code == 1 and "not a selkd cache" in err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    code, err = run_cli(["info", str(tmp_path / "nope")], capsys)
    assert code == 1 and "nope" in err


def test_rows_without_text_field_are_counted_and_skipped(tmp_path, tiny_teacher_dir, text_corpus_dir, capsys):
    data = tmp_path / "mixed.jsonl"
    rows = [json.loads(line) for line in (text_corpus_dir / "part-00.jsonl").read_text().splitlines()[:30]]
    rows.insert(3, {"title": "no text here"})
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code, err = run_cli(base_args(tiny_teacher_dir, data, tmp_path / "o"), capsys)
    assert code == 0
    assert "1 row" in err and "mixed.jsonl" in err


def test_python_m_and_config_file(tmp_path, tiny_teacher_dir, text_corpus_dir):
    import subprocess
    import sys

    conf = tmp_path / "build.yaml"
    conf.write_text(
        f"teacher: {tiny_teacher_dir}\ndata: [{text_corpus_dir}]\nclasses: topk:4\nmax_seq_len: 64\n"
        "limit_tokens: 2000\nprogress: false\ndevice: cpu\n"
    )
    out = tmp_path / "c"
    proc = subprocess.run(
        [sys.executable, "-m", "selkd.cache", "build", "--config", str(conf), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert open_cache(str(out)).header["classes"]["text"] == "topk:4"
    assert "B/position" in proc.stderr


def test_config_rejects_rank_outside_world():
    with pytest.raises(ConfigError, match="--rank 2 must be < --world-size 2"):
        BuildConfig(teacher="t", data=["d"], out="o", rank=2, world_size=2)


def test_copy_of_cache_reads_the_same(tmp_path, tiny_teacher_dir, text_corpus_dir):
    out = tmp_path / "c"
    build_cache(cfg(tiny_teacher_dir, text_corpus_dir, out, classes="topk:4"))
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    a, b = open_cache(str(out)).get(5), open_cache(str(copy)).get(5)
    assert torch.equal(a.targets.ids, b.targets.ids)

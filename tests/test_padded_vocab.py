"""Padded vocabularies (issue 11): the classes are the tokenizer's tokens; head rows beyond them are padding.

Qwen2.5-7B's head has 152,064 rows and Qwen2.5-0.5B's 151,936, over one tokenizer of 151,665 tokens. Here
one tokenizer (the tiny 384-token BPE) is saved with every model, and heads of 448 and 416 rows play the
two Qwen2.5 sizes: teacher head larger than the student's, and the reverse, offline (``selkd-cache build``
then ``selkd-train --cache``) and online (``selkd-train --teacher``), for topk:K, sample:N and full. The
448-row teacher puts real mass on its padded rows (they copy real rows, scaled up), so the recorded
padding mass is not zero and the dropped classes would otherwise win top-k and sampling.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from selkd.cache import open_cache
from selkd.cache.classes import ClassSpec, padding_mass, teacher_outputs
from selkd.cache.cli import main as cache_main
from selkd.cache.logits import softmax_entropy
from selkd.cache.teacher import load_causal_lm, load_tokenizer, num_classes, vocab_size
from selkd.trainer import losses as L
from selkd.trainer.cli import main as train_main
from selkd.trainer.online import OnlineTeacher

C = 384  # len(tiny tokenizer)
BIG, SMALL, SHORT = 448, 416, 320  # head rows: two padded heads, and one too small for the tokenizer
SEQ, LIMIT_TOKENS, EVAL_FRACTION = 64, 2000, 0.1
MODES = ["topk:8", "sample:16", "full"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def heads(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any, tiny_model: Callable[..., Path]) -> dict:
    """Model directories by role, all with the tiny tokenizer: ``teacher-big`` (448 rows, mass on its
    padding), ``teacher-small`` (416), ``student-big`` (448), ``student-small`` (416), ``student-short`` (320)."""
    root = tmp_path_factory.mktemp("padded_heads")
    plain = tiny_model(root / "plain", tiny_tokenizer, vocab=BIG, hidden=32, layers=1, seed=5)
    model = load_causal_lm(str(plain), torch.device("cpu"), torch.float32, frozen=False)
    with torch.no_grad():  # padded rows: real rows scaled up, so they hold a good share of the mass
        w = model.get_output_embeddings().weight
        w[C:] = 3.0 * w[: BIG - C]
    from make_tiny import save_model

    out = {"teacher-big": save_model(model, tiny_tokenizer, root / "teacher-big")}
    shapes = {"teacher-small": (SMALL, 32, 6), "student-big": (BIG, 16, 7), "student-small": (SMALL, 16, 8)}
    shapes["student-short"] = (SHORT, 16, 9)
    for role, (vocab, hidden, seed) in shapes.items():
        out[role] = tiny_model(root / role, tiny_tokenizer, vocab=vocab, hidden=hidden, layers=1, seed=seed)
    return out


def _build(teacher: Path, corpus: Path, out: Path, classes: str) -> str:
    argv = ["build", "--teacher", str(teacher), "--data", str(corpus), "--out", str(out), "--classes", classes,
            "--max-seq-len", str(SEQ), "--limit-tokens", str(LIMIT_TOKENS), "--eval-fraction", str(EVAL_FRACTION),
            "--part-tokens", "1024", "--batch-size", "4", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert cache_main(argv) == 0
    return str(out)


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory, heads: dict, text_corpus_dir: Path) -> dict:
    """(teacher role, mode) -> a cache built by ``selkd-cache build``."""
    root = tmp_path_factory.mktemp("padded_caches")
    return {
        (t, m): _build(heads[t], text_corpus_dir, root / f"{t}-{m.replace(':', '')}", m)
        for t in ("teacher-big", "teacher-small")
        for m in MODES
    }


def _train(argv: list[str], out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    base = ["--out", str(out), "--batch-size", "4", "--steps", "2", "--lr", "1e-2", "--save-every", "0",
            "--eval-every", "2", "--eval-batches", "1", "--log-every", "1", "--num-workers", "0",
            "--progress", "false", "--device", "cpu"]  # fmt: skip
    capsys.readouterr()
    rc = train_main(base + argv)
    return rc, capsys.readouterr().err


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if not r.get("eval")]


def _direct(teacher: Path, seqs: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's padding mass and its entropy over the C real classes, from its own forward: [T] each."""
    model = load_causal_lm(str(teacher), torch.device("cpu"), torch.float32)
    pad, ent = [], []
    with torch.no_grad():
        for s in seqs:
            logits = model(input_ids=torch.from_numpy(s.input_ids.astype(np.int64))[None]).logits[0, :-1]
            pad.append(logits.softmax(-1)[:, C:].sum(-1))
            ent.append(softmax_entropy(logits[:, :C]).entropy)
    return torch.cat(pad), torch.cat(ent)


# --------------------------------------------------------------------------- offline


@pytest.mark.parametrize("mode", MODES)
def test_build_drops_the_padded_classes_and_records_their_mass(
    caches: dict, heads: dict, mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    reader = open_cache(caches[("teacher-big", mode)])
    assert (reader.vocab_size, reader.num_classes) == (BIG, C)
    seqs = [*reader.iter_sequences("train"), *reader.iter_sequences("eval")]
    for s in seqs:
        t = s.targets
        if t.ids is None:
            assert t.num_classes == C and torch.allclose(t.probs().sum(-1), torch.ones(1), atol=0.02)
        else:
            assert int(t.ids.max()) < C
    pad, ent = _direct(heads["teacher-big"], seqs)
    assert pad.mean() > 0.05  # not negligible: dropping it matters
    recs = [p.record for p in reader.parts]
    assert sum(r["sum_padding_mass"] for r in recs) == pytest.approx(float(pad.sum()), rel=1e-4)
    assert max(r["max_padding_mass"] for r in recs) == pytest.approx(float(pad.max()), rel=1e-4)
    stored_ent = np.concatenate([s.teacher_entropy for s in seqs])
    np.testing.assert_allclose(stored_ent, ent.numpy(), atol=0.01)  # over the real classes (float16)
    capsys.readouterr()
    assert cache_main(["verify", caches[("teacher-big", mode)]]) == 0
    assert cache_main(["info", caches[("teacher-big", mode)]]) == 0
    shown = capsys.readouterr().out
    assert f"{C:,} classes, teacher head {BIG:,}" in shown
    assert f"padding mass    {float(pad.mean()):.3g} mean, {float(pad.max()):.3g} max" in shown


def test_no_padding_or_minus_inf_padding_records_zero() -> None:
    """A head without padded rows, or whose padded logits are -inf, has padding mass exactly 0 (no NaN)."""
    logits = torch.randn(5, C)
    out = teacher_outputs(logits, torch.zeros(5, dtype=torch.long), ClassSpec.parse("topk:4"), classes=C)
    assert torch.equal(out.padding_mass, torch.zeros(5))
    masked = torch.cat([logits, torch.full((5, 64), float("-inf"))], -1)  # padding at -inf: 0, no NaN
    assert torch.equal(padding_mass(masked, logits.logsumexp(-1), C), torch.zeros(5))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("teacher", "student"), [("teacher-big", "student-small"), ("teacher-small", "student-big")])
def test_offline_training_with_either_head_larger(
    tmp_path: Path, caches: dict, heads: dict, teacher: str, student: str, mode: str, capsys: pytest.CaptureFixture
) -> None:
    """The student head smaller than the teacher's (448 vs 416) was refused before; both directions train."""
    rc, err = _train(["--cache", caches[(teacher, mode)], "--student", str(heads[student])], tmp_path, capsys)
    assert rc == 0, err
    losses = _losses(tmp_path)
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_a_student_head_smaller_than_the_tokenizer_is_refused(
    tmp_path: Path, caches: dict, heads: dict, text_corpus_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = f"the student's head ({SHORT} rows) is smaller than the tokenizer ({C} tokens)"
    rc, err = _train(["--cache", caches[("teacher-big", "topk:8")], "--student", str(heads["student-short"])],
                     tmp_path / "offline", capsys)  # fmt: skip
    errors = [line for line in err.splitlines() if line.startswith("selkd-train: error:")]
    assert rc == 1 and len(errors) == 1 and expected in errors[0] and "Traceback" not in err, err
    online = ["--teacher", str(heads["teacher-big"]), "--data", str(text_corpus_dir), "--classes", "topk:8",
              "--max-seq-len", str(SEQ), "--limit-tokens", str(LIMIT_TOKENS)]  # fmt: skip
    rc, err = _train([*online, "--student", str(heads["student-short"])], tmp_path / "online", capsys)
    assert rc == 1 and expected in err, err


def test_a_teacher_head_smaller_than_its_tokenizer_is_refused(
    tmp_path: Path, heads: dict, text_corpus_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["build", "--teacher", str(heads["student-short"]), "--data", str(text_corpus_dir), "--out",
            str(tmp_path / "c"), "--limit-tokens", "500", "--device", "cpu", "--no-progress"]  # fmt: skip
    capsys.readouterr()
    assert cache_main(argv) == 1
    err = capsys.readouterr().err
    assert f"its head has {SHORT} rows, fewer than its tokenizer's {C} tokens" in err


# --------------------------------------------------------------------------- online


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("teacher", "student"), [("teacher-big", "student-small"), ("teacher-small", "student-big")])
def test_online_training_with_either_head_larger(
    tmp_path: Path,
    heads: dict,
    text_corpus_dir: Path,
    teacher: str,
    student: str,
    mode: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    online = ["--teacher", str(heads[teacher]), "--data", str(text_corpus_dir), "--classes", mode, "--max-seq-len",
              str(SEQ), "--limit-tokens", str(LIMIT_TOKENS), "--eval-fraction", str(EVAL_FRACTION)]  # fmt: skip
    rc, err = _train([*online, "--student", str(heads[student])], tmp_path, capsys)
    assert rc == 0, err
    losses = _losses(tmp_path)
    assert len(losses) == 2 and all(np.isfinite(losses))


@pytest.mark.parametrize("mode", MODES)
def test_online_targets_are_the_cache_targets_over_real_classes(caches: dict, heads: dict, mode: str) -> None:
    """The live teacher drops the same padded classes: topk and full targets equal the cache's, sampled ids
    stay below C (the draws follow another generator)."""
    reader = open_cache(caches[("teacher-big", mode)])
    model = load_causal_lm(str(heads["teacher-big"]), torch.device("cpu"), torch.float32)
    classes = num_classes(load_tokenizer(str(heads["teacher-big"])))
    assert (classes, vocab_size(model)) == (C, BIG)
    live = OnlineTeacher(model, ClassSpec.parse(mode), 1.0, classes=classes)
    stored = list(reader.iter_sequences("train"))[:4]
    got = live.sequences([s.input_ids for s in stored], np.array([s.seq_index for s in stored]),
                         [s.doc_start for s in stored])  # fmt: skip
    for s, g in zip(stored, got, strict=True):
        np.testing.assert_allclose(g.teacher_entropy, s.teacher_entropy, atol=0.01)
        if mode == "sample:16":
            assert int(g.targets.ids.max()) < C
        elif g.targets.ids is not None:
            assert torch.equal(g.targets.ids, s.targets.ids)
        else:
            assert g.targets.logprobs.shape[-1] == C
            torch.testing.assert_close(g.targets.logprobs, s.targets.logprobs, atol=0.01, rtol=0)


def test_online_full_targets_equal_the_brute_force_formula_per_position(heads: dict) -> None:
    """Online full targets (one fused softmax pass per chunk, the normaliser reused, row by row) equal the
    plain formula at every position: log_softmax over the C real classes, its entropy and the next
    token's log-prob; a sequence longer than a chunk (two chunks joined) and a short one (one chunk)."""
    from selkd.cache import classes

    model = load_causal_lm(str(heads["teacher-big"]), torch.device("cpu"), torch.float32)
    live = OnlineTeacher(model, ClassSpec.parse("full"), 1.0, classes=C, doc_attention=False)
    g = np.random.default_rng(0)
    seqs = [g.integers(0, C, n).astype(np.int32) for n in (classes.CHUNK + 45, 40)]
    starts = [np.eye(1, len(x), dtype=np.bool_)[0] for x in seqs]
    got = live.sequences(seqs, np.arange(2), starts)
    for x, s in zip(seqs, got, strict=True):
        ids = torch.from_numpy(x.astype(np.int64))[None]
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1, :C].double(), -1)
        torch.testing.assert_close(s.targets.logprobs.double(), lp, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            torch.from_numpy(s.teacher_entropy).double(), -(lp.exp() * lp).sum(-1), atol=1e-5, rtol=0
        )
        want = lp.gather(-1, ids[0, 1:, None]).squeeze(-1)
        torch.testing.assert_close(torch.from_numpy(s.teacher_logprob).double(), want, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- old caches, losses


def test_a_cache_without_num_classes_reads_as_before_and_is_not_resumed_with_another_width(
    tmp_path: Path, caches: dict, heads: dict, text_corpus_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Caches written before ``num_classes`` was recorded: their ``vocab_size`` is the class width. Resuming
    one whose teacher head is padded would mix widths: refused, naming the width."""
    old = tmp_path / "old"
    shutil.copytree(caches[("teacher-big", "topk:8")], old)
    root = json.loads((old / "zarr.json").read_text())
    del root["attributes"]["selkd"]["num_classes"]
    (old / "zarr.json").write_text(json.dumps(root))
    reader = open_cache(str(old))
    assert "num_classes" not in reader.header and reader.num_classes == BIG
    capsys.readouterr()
    rc = cache_main(["build", "--teacher", str(heads["teacher-big"]), "--data", str(text_corpus_dir), "--out",
                     str(old), "--classes", "topk:8", "--max-seq-len", str(SEQ), "--limit-tokens", str(LIMIT_TOKENS),
                     "--eval-fraction", str(EVAL_FRACTION), "--part-tokens", "1024", "--batch-size", "4", "--device",
                     "cpu", "--no-progress"])  # fmt: skip
    assert rc == 1 and f"classes (target width): {BIG} -> {C}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("mode", "loss"), [(m, loss) for m in MODES for loss in ("fkl", "rkl", "jsd") if loss == "fkl" or m != "sample:16"]
)
def test_student_logits_of_minus_inf_on_its_padding_are_safe(mode: str, loss: str) -> None:
    """A student head that masks its padded rows with -inf: every loss its targets define is finite with
    finite gradients, and its entropy (over the whole head) is finite."""
    g = torch.Generator().manual_seed(0)
    targets = teacher_outputs(torch.randn(6, BIG, generator=g), torch.zeros(6, dtype=torch.long),
                              ClassSpec.parse(mode), generator=g, classes=C).targets  # fmt: skip
    student = torch.cat([torch.randn(6, C, generator=g), torch.full((6, SMALL - C), float("-inf"))], -1)
    student.requires_grad_(True)
    values = L.get_loss(loss)(student, targets)
    values.sum().backward()
    assert torch.isfinite(values).all() and torch.isfinite(student.grad).all()
    assert torch.isfinite(softmax_entropy(student.detach()).entropy).all()

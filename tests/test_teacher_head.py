"""The teacher's LM head a chunk of positions at a time (cache/logits.py's TeacherHead) and a teacher
spread over devices with ``--teacher-device-map``: both must give the cache the whole teacher gives."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from selkd.cache import open_cache
from selkd.cache.build import build_cache
from selkd.cache.classes import head_outputs, teacher_outputs
from selkd.cache.config import BuildConfig
from selkd.cache.logits import TeacherHead
from selkd.cache.modes import ClassSpec
from selkd.cache.teacher import ModelError, load_causal_lm
from selkd.trainer.online import OnlineTeacher

# layer 1 and the head offloaded to disk, the rest on the CPU: accelerate's hooks load them per forward
OFFLOAD_MAP = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "disk",
}


def _cfg(teacher: Path, data: Path, out: Path, **kw: object) -> BuildConfig:
    base: dict[str, object] = dict(
        teacher=str(teacher),
        data=[str(data)],
        out=str(out),
        classes="topk:8",
        max_seq_len=64,
        part_tokens=1024,
        limit_tokens=3000,
        eval_fraction=0.0,
        progress=False,
        device="cpu",
        batch_size=4,
    )
    return BuildConfig(**{**base, **kw})  # type: ignore[arg-type]


def _tree(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")}


def _all_targets(path: Path) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    reader = open_cache(str(path))
    return [
        (s.seq_index, s.targets.ids.numpy(), s.targets.logprobs.numpy(), s.teacher_entropy)
        for s in reader.iter_sequences("train")
    ]


def test_offloaded_layers_build_the_same_cache(tmp_path, tiny_teacher_dir, text_corpus_dir):
    """A device map that puts a layer and the head on disk (accelerate loads them per forward) gives the
    cache of the teacher in one piece, and writes nothing into the teacher's directory."""
    before = _tree(tiny_teacher_dir)
    build_cache(_cfg(tiny_teacher_dir, text_corpus_dir, tmp_path / "whole"))
    build_cache(
        _cfg(tiny_teacher_dir, text_corpus_dir, tmp_path / "mapped", teacher_device_map=json.dumps(OFFLOAD_MAP))
    )
    whole, mapped = _all_targets(tmp_path / "whole"), _all_targets(tmp_path / "mapped")
    assert len(whole) == len(mapped) > 0
    for (i, ids, lp, ent), (j, ids2, lp2, ent2) in zip(whole, mapped):
        assert i == j
        np.testing.assert_array_equal(ids, ids2)
        np.testing.assert_allclose(lp, lp2, atol=1e-3)
        np.testing.assert_allclose(ent, ent2, atol=1e-3)
    assert _tree(tiny_teacher_dir) == before


def test_head_chunks_equal_the_models_logits(qwen_like_teacher_dir):
    """Chunks of 7 positions through one reused buffer: the model's own logits (a padded, tied head), and
    the class selection of teacher_outputs over them."""
    model = load_causal_lm(str(qwen_like_teacher_dir), "cpu", torch.float32)
    head = TeacherHead(model, chunk=7)
    x = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=x).logits[1, :-1]
        hidden = head.decode(x)[1, :-1]
        chunks = [(s, c.data_ptr(), c.clone()) for s, c in head.chunks(hidden)]
        spec = ClassSpec.parse("topk:16")
        got = head_outputs(head, hidden, x[1, 1:], spec, 1.0, None, 151_665)
        ref = teacher_outputs(want, x[1, 1:], spec, 1.0, None, chunk=7, classes=151_665)
    assert [s for s, _, _ in chunks] == list(range(0, 39, 7))
    assert len({p for _, p, _ in chunks}) == 1  # one buffer for every chunk: [T, V] never exists
    torch.testing.assert_close(torch.cat([c for _, _, c in chunks]), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.targets.ids, ref.targets.ids)
    torch.testing.assert_close(got.targets.logprobs, ref.targets.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.next_logprob, ref.next_logprob, atol=1e-5, rtol=1e-5)


def test_online_teacher_with_offloaded_layers(tiny_teacher_dir):
    """An online teacher loaded with a device map (its embedding's weights offloaded too) makes the same
    targets as the teacher in one piece."""
    seqs = [np.random.default_rng(s).integers(0, 300, 33) for s in range(3)]
    docs = [np.eye(1, 33, 0, dtype=bool)[0] for _ in seqs]
    offloaded = {**OFFLOAD_MAP, "model.embed_tokens": "disk"}
    out = []
    for device_map in (None, json.dumps(offloaded)):
        model = load_causal_lm(str(tiny_teacher_dir), "cpu", torch.float32, device_map=device_map)
        live = OnlineTeacher(model, ClassSpec.parse("topk:8"), 1.0)
        out.append(live.sequences(seqs, np.arange(3), docs))
    for a, b in zip(*out):
        assert torch.equal(a.targets.ids, b.targets.ids)
        torch.testing.assert_close(a.targets.logprobs, b.targets.logprobs, atol=1e-5, rtol=1e-5)


def test_device_map_naming_a_missing_gpu_is_one_error(tmp_path, tiny_teacher_dir):
    """GPU 3 on a machine without it: one line naming the option, and no offload folder left behind."""
    leftovers = set(Path(tempfile.gettempdir()).glob("selkd-offload-*"))
    with pytest.raises(ModelError, match="--teacher-device-map") as err:
        load_causal_lm(str(tiny_teacher_dir), "cpu", torch.float32, device_map='{"": 3}')
    assert "\n" not in str(err.value) and "names GPU 3 but this machine has 0" in str(err.value)
    assert set(Path(tempfile.gettempdir()).glob("selkd-offload-*")) == leftovers


def test_topk_targets_and_padding_mass_equal_the_brute_force_formulas():
    """teacher_outputs' top-k (top-k of the logits, tail = the other probabilities summed in the scratch
    buffer) against log_softmax -> topk -> logsumexp of the rest, per position: ordinary rows, a row
    whose tail underflows float32 (exp(-200)), a row whose other classes are -inf (tail -inf), chunks
    of 3 sharing one scratch, and the padded columns' mass (finite and -inf) against logsumexp."""
    g = torch.Generator().manual_seed(0)
    c, v, k = 50, 70, 4
    logits = torch.randn(8, v, generator=g) * 3
    logits[5, :c] = -200.0
    logits[5, 7] = 0.0  # the tail, 46 classes at exp(-200) each, is 0 in float32
    logits[6, 4:c] = float("-inf")  # nothing outside the top 4
    logits[7, c:] = float("-inf")  # padding at -inf: mass 0
    nxt = torch.randint(0, c, (8,), generator=g)
    got = teacher_outputs(logits, nxt, ClassSpec.parse(f"topk:{k}"), chunk=3, classes=c)
    logp = logits[:, :c].log_softmax(-1)
    vals, ids = logp.topk(k, dim=-1)
    tail = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    assert torch.equal(got.targets.ids, ids)
    torch.testing.assert_close(got.targets.logprobs, vals, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.targets.tail_logmass, tail, atol=1e-4, rtol=1e-5)
    assert float(got.targets.tail_logmass[5]) == pytest.approx(math.log(c - k) - 200, abs=1e-3)  # 46 left at -200
    assert got.targets.tail_logmass[6] == float("-inf")
    pad = torch.sigmoid(logits[:, c:].logsumexp(-1) - logits[:, :c].logsumexp(-1))
    torch.testing.assert_close(got.padding_mass, pad, atol=1e-6, rtol=1e-5)
    assert got.padding_mass[7] == 0.0

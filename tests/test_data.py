"""trainer/data.py: collate, the deterministic rank/worker split, exact resume, sample selection,
missing parts, and that streamed batches hold what the reader stores."""

from __future__ import annotations

import json
import math
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from selkd.cache.build import build_cache
from selkd.cache.config import BuildConfig
from selkd.cache.reader import CachedSequence, CacheError, CacheReader, open_cache
from selkd.trainer.batch import IGNORE_INDEX, Batch, collate
from selkd.trainer.data import CacheStream, mp_context
from selkd.trainer.loader import make_loader

BATCH = 4
UNIT = 16  # two units per part (a part holds 2048 // 64 = 32 sequences)


def _build(out: Path, teacher: Path, corpus: Path, **kw: object) -> Path:
    build_cache(
        BuildConfig(
            teacher=str(teacher),
            data=[str(corpus)],
            out=str(out),
            classes="sample:8",
            max_seq_len=64,
            part_tokens=2048,
            limit_tokens=12_000,
            device="cpu",
            progress=False,
            **kw,
        )
    )
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, text_corpus_dir: Path) -> Path:
    return _build(tmp_path_factory.mktemp("data_cache") / "cache", tiny_teacher_dir, text_corpus_dir)


@pytest.fixture(scope="module")
def scored_cache_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, tiny_student_dir: Path, text_corpus_dir: Path
) -> Path:
    return _build(
        tmp_path_factory.mktemp("data_scored") / "cache",
        tiny_teacher_dir,
        text_corpus_dir,
        student=str(tiny_student_dir),
        sample_ratio=0.5,
    )


@pytest.fixture(scope="module")
def reader(cache_dir: Path) -> CacheReader:
    return open_cache(str(cache_dir))


def _stream(url: Path | str, **kw: object) -> CacheStream:
    kw.setdefault("batch_size", BATCH)
    kw.setdefault("unit_size", UNIT)
    return CacheStream(str(url), **kw)  # type: ignore[arg-type]


def _ids(batches: list[Batch]) -> list[list[int]]:
    return [b.seq_index.tolist() for b in batches]


def _run_epochs(stream: CacheStream, loader: object, end_epoch: int) -> list[list[int]]:
    """Iterate the loader until the stream's cursor reaches ``end_epoch``."""
    out: list[list[int]] = []
    while stream.epoch < end_epoch:
        out += _ids(list(loader))  # type: ignore[call-overload]
    return out


def _positions(reader: CacheReader, split: str = "train") -> dict[int, int]:
    """Global sequence index -> position in the split (what ``reader.get`` takes)."""
    out, base = {}, 0
    for rec in reader.split_parts(split):
        for j, s in enumerate(reader.read_part(rec).arrays["seq_index"].tolist()):
            out[s] = base + j
        base += rec.n_sequences
    return out


# --- collate ---------------------------------------------------------------------------------------


def _truncate(seq: CachedSequence, n: int) -> CachedSequence:
    t = seq.targets
    return replace(
        seq,
        input_ids=seq.input_ids[:n],
        doc_start=seq.doc_start[:n],
        teacher_entropy=seq.teacher_entropy[: n - 1],
        teacher_logprob=seq.teacher_logprob[: n - 1],
        targets=replace(t, ids=t.ids[: n - 1], logprobs=t.logprobs[: n - 1]),  # type: ignore[index]
        trained=None if seq.trained is None else seq.trained[: n - 1],
    )


def test_collate_shapes_padding_labels(reader: CacheReader) -> None:
    full, short = reader.get(0), _truncate(reader.get(1), 10)
    batch = collate([full, short], pad_id=7)
    b, length = 2, len(full)
    for t in (batch.input_ids, batch.attention_mask, batch.labels, batch.valid):
        assert t.shape == (b, length)
    assert batch.input_ids.dtype == batch.labels.dtype == batch.attention_mask.dtype == torch.int64
    assert batch.valid.dtype == torch.bool
    assert batch.teacher_entropy.dtype == batch.teacher_logprob.dtype == torch.float32
    assert batch.targets.shape == (b, length) and batch.targets.mode == "sample"
    assert batch.seq_index.tolist() == [full.seq_index, short.seq_index]

    assert batch.input_ids[0].tolist() == full.input_ids.tolist()
    assert batch.input_ids[1, :10].tolist() == short.input_ids.tolist()
    assert (batch.input_ids[1, 10:] == 7).all()
    assert batch.attention_mask.sum(1).tolist() == [length, 10]
    assert batch.num_tokens == length + 10 and batch.num_targets == length - 1 + 9

    # labels: the next token, -100 at the last real position and at padding
    assert batch.labels[0, :-1].tolist() == full.input_ids[1:].tolist()
    assert batch.labels[0, -1] == IGNORE_INDEX
    assert batch.labels[1, :9].tolist() == short.input_ids[1:].tolist()
    assert (batch.labels[1, 9:] == IGNORE_INDEX).all()
    assert torch.equal(batch.valid, batch.labels != IGNORE_INDEX)

    # targets, entropies: real where valid, padding elsewhere
    c = short.targets.num_classes
    assert torch.equal(batch.targets.ids[1, :9, :c], short.targets.ids)  # type: ignore[index]
    assert torch.equal(batch.targets.logprobs[1, :9, :c], short.targets.logprobs)
    assert torch.isneginf(batch.targets.logprobs[1, 9:]).all() and (batch.targets.ids[1, 9:] == 0).all()  # type: ignore[index]
    assert torch.isneginf(batch.targets.logprobs[0, -1]).all()
    assert np.allclose(batch.teacher_entropy[1, :9].numpy(), short.teacher_entropy)
    assert (batch.teacher_entropy[1, 9:] == 0).all() and (batch.teacher_logprob[~batch.valid] == 0).all()
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids) and moved.targets.shape == batch.targets.shape
    with pytest.raises(ValueError):
        collate([], pad_id=0)


def test_read_range_matches_get(reader: CacheReader) -> None:
    rec = reader.split_parts("train")[1]
    base = sum(p.n_sequences for p in reader.split_parts("train")[:1])
    data = reader.read_range(rec, 5, 13)
    assert len(data) == 8
    for j in range(8):
        got, want = data.sequence(j), reader.get(base + 5 + j)
        assert got.seq_index == want.seq_index
        assert np.array_equal(got.input_ids, want.input_ids)
        assert np.array_equal(got.teacher_entropy, want.teacher_entropy)
        assert torch.equal(got.targets.ids, want.targets.ids)  # type: ignore[arg-type]
        assert torch.equal(got.targets.logprobs, want.targets.logprobs)
    with pytest.raises(IndexError):
        reader.read_range(rec, 0, rec.n_sequences + 1)


# --- order and split -------------------------------------------------------------------------------


def test_ranks_and_workers_split_without_overlap(cache_dir: Path) -> None:
    world = 2
    per_rank: list[list[list[int]]] = []
    for rank in range(world):
        stream = _stream(cache_dir, rank=rank, world_size=world, seed=3)
        per_rank.append(_ids(list(make_loader(stream, num_workers=2))))
        assert len(per_rank[-1]) == stream.steps_per_epoch()
        assert all(len(b) == BATCH for b in per_rank[-1])
        # whatever the number of workers, the rank sees the same batches in the same order
        direct = _ids(list(_stream(cache_dir, rank=rank, world_size=world, seed=3)))
        assert per_rank[-1] == direct
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    seen = [s for batches in per_rank for b in batches for s in b]
    assert len(seen) == len(set(seen)), "a sequence was streamed twice in one epoch"
    n = stream.num_sequences
    assert len(seen) == n - n % (BATCH * world)
    assert set(seen) <= set(_positions(open_cache(str(cache_dir))))
    # rank r takes global batch s * W + r of the single-process order
    single = _ids(list(_stream(cache_dir, seed=3)))
    assert per_rank[0] == single[0::2][: len(per_rank[0])] and per_rank[1] == single[1::2][: len(per_rank[1])]


def test_order_depends_on_seed_and_epoch(cache_dir: Path) -> None:
    def epoch_ids(seed: int, epoch: int) -> list[list[int]]:
        stream = _stream(cache_dir, seed=seed)
        stream.set_epoch(epoch)
        return _ids(list(stream))

    a0, a1 = epoch_ids(0, 0), epoch_ids(0, 1)
    assert a0 == epoch_ids(0, 0)
    assert a0 != a1 and a0 != epoch_ids(1, 0)
    n = _stream(cache_dir).num_sequences
    for ids in (a0, a1):
        flat = [s for b in ids for s in b]
        assert len(flat) == len(set(flat)) == n - n % BATCH
    unshuffled = _ids(list(_stream(cache_dir, shuffle=False)))
    flat = [s for b in unshuffled for s in b]
    stored = sorted(_positions(open_cache(str(cache_dir))).items(), key=lambda kv: kv[1])
    assert flat == [s for s, _ in stored][: len(flat)]


def test_drop_last_false_equal_full_batches(cache_dir: Path) -> None:
    n = _stream(cache_dir).num_sequences
    assert n % (BATCH * 2), "test needs a remainder"
    ranks = [_ids(list(_stream(cache_dir, rank=r, world_size=2, drop_last=False))) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == math.ceil(n / (BATCH * 2))
    assert all(len(b) == BATCH for r in ranks for b in r)
    assert len({s for r in ranks for b in r for s in b}) == n
    single = _ids(list(_stream(cache_dir, drop_last=False)))
    assert [len(b) for b in single[:-1]] == [BATCH] * (len(single) - 1) and len(single[-1]) == (n % BATCH or BATCH)
    assert len({s for b in single for s in b}) == sum(len(b) for b in single) == n


def test_each_unit_read_once_per_epoch(cache_dir: Path) -> None:
    stream = _stream(cache_dir, drop_last=False)
    list(stream)
    assert stream.last_units_read == stream._layout.num_units


# --- resume ----------------------------------------------------------------------------------------


def test_resume_exact_mid_epoch_across_boundary_and_worker_counts(cache_dir: Path) -> None:
    ref_stream = _stream(cache_dir, seed=5)
    steps = ref_stream.steps_per_epoch()
    reference = _run_epochs(ref_stream, make_loader(ref_stream, num_workers=0), end_epoch=2)
    assert len(reference) == 2 * steps

    for k, workers_before, workers_after in ((7, 2, 0), (steps - 1, 0, 2), (steps, 1, 1), (steps + 3, 0, 1)):
        stream = _stream(cache_dir, seed=5)
        loader = make_loader(stream, num_workers=workers_before, prefetch=3)
        taken: list[list[int]] = []
        while len(taken) < k:
            for batch in loader:  # workers prefetch ahead; only what is taken counts
                taken.append(batch.seq_index.tolist())
                if len(taken) == k:
                    break
        state = json.loads(json.dumps(loader.state_dict()))
        assert state["epoch"] == k // steps and state["step"] == k % steps
        assert state["samples"] == (k % steps) * BATCH
        resumed = _stream(cache_dir, seed=5)
        loader2 = make_loader(resumed, num_workers=workers_after)
        loader2.load_state_dict(state)
        assert len(loader2) == steps - k % steps
        rest = _run_epochs(resumed, loader2, end_epoch=2)
        assert taken + rest == reference, (k, workers_before, workers_after)


def test_resume_with_set_epoch_loop(cache_dir: Path) -> None:
    """The usual training loop: ``for epoch in range(start, n): set_epoch(epoch); for b in loader``."""
    ref_stream = _stream(cache_dir)
    reference = _run_epochs(ref_stream, make_loader(ref_stream, num_workers=0, prefetch=0), end_epoch=2)
    stream = _stream(cache_dir)
    loader = make_loader(stream, num_workers=0)
    stream.set_epoch(0)
    it = iter(loader)
    taken = [next(it).seq_index.tolist() for _ in range(10)]
    state = loader.state_dict()
    del it
    stream2 = _stream(cache_dir)
    loader2 = make_loader(stream2, num_workers=1)
    loader2.load_state_dict(state)
    for epoch in range(state["epoch"], 2):
        stream2.set_epoch(epoch)
        taken += _ids(list(loader2))
    assert taken == reference


def test_set_epoch_rewinds_a_partial_iteration(cache_dir: Path) -> None:
    """Evaluation pattern: ``set_epoch(0)`` then a limited number of batches, repeatedly."""
    stream = _stream(cache_dir, shuffle=False, drop_last=False)
    firsts = []
    for _ in range(2):
        stream.set_epoch(0)
        for i, batch in enumerate(stream):
            if i == 2:
                break
            firsts.append(batch.seq_index.tolist())
    assert firsts[:2] == firsts[2:]


def test_resume_with_another_world_size(cache_dir: Path) -> None:
    single = _ids(list(_stream(cache_dir, seed=2)))
    stream = _stream(cache_dir, seed=2)
    it = iter(stream)
    for _ in range(6):
        next(it)
    state = stream.state_dict()
    assert state["samples"] == 6 * BATCH and state["global_batches"] == 6
    ranks = []
    for rank in range(2):
        s = _stream(cache_dir, seed=2, rank=rank, world_size=2)
        s.load_state_dict(state)
        ranks.append(_ids(list(s)))
    assert len(ranks[0]) == len(ranks[1]) == (len(single) - 6) // 2
    assert ranks[0] == single[6::2][: len(ranks[0])] and ranks[1] == single[7::2][: len(ranks[1])]


def test_load_state_refuses_another_order(cache_dir: Path) -> None:
    state = _stream(cache_dir, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        _stream(cache_dir, seed=2).load_state_dict(state)


# --- sample selection, missing parts ---------------------------------------------------------------


def test_sample_ratio_keeps_top_scored(scored_cache_dir: Path, cache_dir: Path) -> None:
    reader = open_cache(str(scored_cache_dir))
    scores = reader.scores()
    assert scores is not None
    idx, val = scores
    stored = np.array(sorted(_positions(reader)), dtype=np.int64)
    score = {int(i): float(v) for i, v in zip(idx, val)}
    ranked = sorted(stored.tolist(), key=lambda s: (-score[s], s))
    expected = set(ranked[: math.ceil(0.5 * len(stored))])

    stream = _stream(scored_cache_dir, sample_ratio=0.5, drop_last=False)
    assert stream.num_sequences == len(expected)
    got = {s for b in _ids(list(stream)) for s in b}
    assert got == expected
    assert min(score[s] for s in got) >= max(score[s] for s in set(stored.tolist()) - got)

    full = _stream(scored_cache_dir, drop_last=False)
    assert full.num_sequences == len(stored)
    with pytest.raises(ValueError, match="sample scores"):
        _stream(cache_dir, sample_ratio=0.5)


def test_missing_parts(cache_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    reader = open_cache(str(copy))
    gone = reader.split_parts("train")[2]
    gone_seqs = set(reader.read_part(gone).arrays["seq_index"].tolist())
    (copy / "selkd" / "commits" / f"{gone.name}.json").unlink()
    with pytest.raises(CacheError, match="incomplete"):
        _stream(copy)

    stream = _stream(copy, allow_missing_parts=True, drop_last=False)
    assert stream.num_sequences == reader.num_sequences("train") - gone.n_sequences
    with pytest.warns(UserWarning, match=r"1 of \d+ parts .*missing"):
        stream.set_epoch(0)
    with pytest.warns(UserWarning, match="epoch 1: 1 of"):
        stream.set_epoch(1)
    with pytest.warns(UserWarning, match="epoch 2: 1 of"):
        stream.set_epoch(2)
    with pytest.warns(UserWarning, match="missing"):
        stream2 = _stream(copy, allow_missing_parts=True, drop_last=False)
        seen = {s for b in _ids(list(make_loader(stream2, num_workers=1))) for s in b}
    assert not seen & gone_seqs
    assert len(seen) == stream2.num_sequences


# --- contents, workers, pickling -------------------------------------------------------------------


def test_loader_batches_equal_reader(cache_dir: Path, reader: CacheReader) -> None:
    pos = _positions(reader)
    stream = _stream(cache_dir, seed=4, drop_last=False)
    batches = list(make_loader(stream, num_workers=1))
    assert sum(len(b) for b in batches) == stream.num_sequences
    for batch in batches[:: max(1, len(batches) // 3)] + batches[-1:]:
        for row, s in enumerate(batch.seq_index.tolist()):
            want = reader.get(pos[s])
            n = len(want)
            assert batch.input_ids[row, :n].tolist() == want.input_ids.tolist()
            assert batch.labels[row, : n - 1].tolist() == want.input_ids[1:].tolist()
            assert np.array_equal(batch.teacher_entropy[row, : n - 1].numpy(), want.teacher_entropy)
            assert np.array_equal(batch.teacher_logprob[row, : n - 1].numpy(), want.teacher_logprob)
            c = want.targets.num_classes
            assert torch.equal(batch.targets.ids[row, : n - 1, :c], want.targets.ids)  # type: ignore[index]
            assert torch.equal(batch.targets.logprobs[row, : n - 1, :c], want.targets.logprobs)
            assert torch.isneginf(batch.targets.logprobs[row, : n - 1, c:]).all()


def test_pickled_stream_reopens_and_start_methods(cache_dir: Path) -> None:
    stream = _stream(cache_dir, seed=9)
    clone = pickle.loads(pickle.dumps(stream))
    assert clone._reader is None  # a spawned worker opens the cache itself
    assert _ids(list(clone)) == _ids(list(stream))
    assert mp_context("s3://bucket/cache") == "spawn"
    assert mp_context(str(cache_dir)) in ("fork", None)
    loader = make_loader(_stream(cache_dir), num_workers=0, prefetch=2)
    first = next(iter(loader))
    assert isinstance(first, Batch) and loader.state_dict()["step"] == 1

"""Tests of selkd.trainer.selection: signals, policies, --select parsing."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from selkd.trainer import losses
from selkd.trainer.selection import (
    POLICIES,
    SIGNALS,
    GlobalQueue,
    SignalInputs,
    compute_scores,
    get_policy,
    get_signal,
    make_policy_state,
    select_positions,
    selection_budget,
)
from selkd.trainer.spec import LOSS_NAMES, POLICY_NAMES, SIGNAL_NAMES, parse_select
from selkd.trainer.student import Objective


def _batch(lengths: list[int], length: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [B, L] and the valid next-token mask of sequences of ``lengths`` tokens (L_i - 1 positions)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(len(lengths), length, generator=g)
    valid = torch.arange(length).unsqueeze(0) < (torch.tensor(lengths) - 1).clamp_min(0).unsqueeze(1)
    return scores, valid


# --------------------------------------------------------------------------- parsing


def test_parse_select() -> None:
    assert parse_select("student-entropy:0.2") == ("student-entropy", 0.2)
    assert parse_select(" ce-ratio:1 ") == ("ce-ratio", 1.0)
    assert parse_select("none") == ("none", 1.0)
    with pytest.raises(ValueError, match=r"unknown signal 'entropy'.*student-entropy"):
        parse_select("entropy:0.2")
    for bad in ("student-entropy:0", "student-entropy:1.5", "student-entropy:-0.1", "student-entropy:nan"):
        with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
            parse_select(bad)
    with pytest.raises(ValueError, match="not a number"):
        parse_select("kl:abc")
    with pytest.raises(ValueError, match="SIGNAL:FRACTION"):
        parse_select("kl")


def test_the_names_agree_with_the_registries() -> None:
    """The CLI lists the names of selkd.trainer.spec (no torch); the registries hold the code by those names."""
    assert tuple(SIGNALS) == SIGNAL_NAMES
    assert tuple(POLICIES) == POLICY_NAMES
    assert tuple(losses.LOSSES) == LOSS_NAMES
    code = "import sys, selkd.trainer.spec; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_objective_resolves_its_names_when_made() -> None:
    obj = Objective("kl", 0.2, "global", "jsd")
    assert obj.scorer is SIGNALS["kl"] and obj.selector is POLICIES["global"] and obj.loss_fn is losses.jsd
    assert Objective("none", 1.0, "none", "fkl").scorer is None
    with pytest.raises(ValueError, match="unknown loss 'kl'"):
        Objective("kl", 0.2, "sequence", "kl")
    with pytest.raises(ValueError, match="unknown selection signal 'entropy'"):
        Objective("entropy", 0.2, "sequence", "fkl")


def test_budget_rounding() -> None:
    n = torch.tensor([0, 1, 5, 30, 39, 511])
    assert selection_budget(n, 0.2).tolist() == [0, 1, 1, 6, 8, math.ceil(0.2 * 511)]
    assert selection_budget(torch.tensor([30]), 0.1).tolist() == [3]  # not 4 from 3.0000000000000004
    assert selection_budget(torch.tensor([400]), 0.0025).tolist() == [1]


# --------------------------------------------------------------------------- policies


@pytest.mark.parametrize("fraction", [0.2, 0.5, 1.0, 0.01])
def test_sequence_policy_exact_counts_and_top_scores(fraction: float) -> None:
    lengths = [40, 23, 2, 1, 11]
    scores, valid = _batch(lengths)
    mask = select_positions(scores, valid, fraction, "sequence")
    assert mask.dtype == torch.bool and not (mask & ~valid).any()
    for i, n_tokens in enumerate(lengths):
        n = max(n_tokens - 1, 0)
        assert int(mask[i].sum()) == (math.ceil(fraction * n - 1e-9) if n else 0)
        if mask[i].any() and (valid[i] & ~mask[i]).any():
            assert scores[i][mask[i]].min() >= scores[i][valid[i] & ~mask[i]].max()


def test_sequence_policy_ties_are_deterministic_and_prefer_early_positions() -> None:
    scores = torch.ones(2, 10)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :3] = False  # invalid positions never win ties
    mask = select_positions(scores, valid, 0.3, "sequence")
    assert mask[0].nonzero().flatten().tolist() == [0, 1, 2]
    assert mask[1].nonzero().flatten().tolist() == [3, 4, 5]
    # -inf / NaN scores at valid positions still lose to invalid-free ranking and stay valid
    scores = torch.tensor([[float("nan"), float("-inf"), 0.5, 0.1]])
    mask = select_positions(scores, torch.tensor([[True, True, False, True]]), 1.0, "sequence")
    assert mask.tolist() == [[True, True, False, True]]


def test_none_policy_is_all_valid() -> None:
    scores, valid = _batch([40, 5, 0])
    assert torch.equal(select_positions(scores, valid, 1.0, "none"), valid)


def test_batch_policy() -> None:
    scores, valid = _batch([40, 10, 3])
    mask = select_positions(scores, valid, 0.25, "batch")
    total = int(valid.sum())
    assert int(mask.sum()) == math.ceil(0.25 * total)
    assert not (mask & ~valid).any()
    assert scores[mask].min() >= scores[valid & ~mask].max()
    # counts are not per sequence: a sequence of high scores takes more than its share
    scores = torch.stack([torch.full((10,), 5.0), torch.zeros(10)])
    mask = select_positions(scores, torch.ones(2, 10, dtype=torch.bool), 0.5, "batch")
    assert mask[0].all() and not mask[1].any()


def test_global_policy_threshold_and_state_dict_round_trip() -> None:
    state = make_policy_state("global", capacity=50)
    assert isinstance(state, GlobalQueue) and make_policy_state("sequence") is None
    valid = torch.ones(1, 20, dtype=torch.bool)
    first = torch.arange(20.0).unsqueeze(0)
    mask = select_positions(first, valid, 0.2, "global", state=state)
    assert mask[0].nonzero().flatten().tolist() == [16, 17, 18, 19]  # first step == batch top 20%
    # high scores fill the queue; a later low-scoring batch selects nothing, a high one everything
    for _ in range(2):
        select_positions(first + 100, valid, 0.2, "global", state=state)
    assert len(state) == 50  # FIFO capacity
    low = select_positions(first, valid, 0.2, "global", state=state)
    assert not low.any()
    snap = state.state_dict()
    high = select_positions(first + 1000, valid, 0.2, "global", state=state)
    assert high[0].nonzero().flatten().tolist() == list(range(10, 20))  # ceil(0.2 * 50) = 10 of the queue
    restored = GlobalQueue()
    restored.load_state_dict(snap)
    assert restored.capacity == 50 and len(restored) == 50
    again = select_positions(first + 1000, valid, 0.2, "global", state=restored)
    assert torch.equal(again, high)
    assert torch.equal(restored.scores, state.scores)
    # invalid positions are neither queued nor selected
    q = GlobalQueue(100)
    partial = valid.clone()
    partial[0, 10:] = False
    m = select_positions(first, partial, 1.0, "global", state=q)
    assert len(q) == 10 and torch.equal(m, partial)
    with pytest.raises(ValueError, match="GlobalQueue"):
        select_positions(first, valid, 0.2, "global")


def test_stochastic_policy_draws_proportional_to_scores() -> None:
    rows = 20_000
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 7.0])
    scores = w.expand(rows, 5).clone()
    valid = torch.ones(rows, 5, dtype=torch.bool)
    valid[:, 4] = False  # never drawn despite the highest score
    g = torch.Generator().manual_seed(0)
    mask, weights = select_positions(scores, valid, 0.25, "stochastic", generator=g, return_weights=True)
    assert torch.all(mask.sum(-1) == 1)  # ceil(0.25 * 4) = 1 per sequence
    assert not mask[:, 4].any()
    freq = mask.float().mean(0)[:4]
    p = w[:4] / w[:4].sum()
    se = (p * (1 - p) / rows).sqrt()
    assert torch.all((freq - p).abs() < 5 * se), (freq, p)
    # weights: self-normalised to mean 1 over each sequence's selected positions
    assert torch.allclose(weights[mask], torch.ones(rows))
    assert torch.all(weights[~mask] == 0)
    # same generator seed -> same draws
    again = select_positions(scores, valid, 0.25, "stochastic", generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, mask)


def test_stochastic_policy_importance_weights_and_negative_scores() -> None:
    rows = 4000
    scores = torch.tensor([-3.0, -2.0, -1.0, 0.0, 1.0, 2.0]).expand(rows, 6).clone()  # shifted: 0..5
    valid = torch.ones(rows, 6, dtype=torch.bool)
    g = torch.Generator().manual_seed(1)
    mask, weights = select_positions(scores, valid, 0.34, "stochastic", generator=g, return_weights=True)
    assert torch.all(mask.sum(-1) == 3)
    assert mask[:, 5].float().mean() > mask[:, 1].float().mean()  # higher score, drawn more often
    # with 3 of 6 drawn, a low-probability pick gets a larger weight than a high-probability one
    both = mask[:, 1] & mask[:, 5]
    assert both.any()
    assert torch.all(weights[both, 1] > weights[both, 5])
    assert torch.allclose(weights.sum(-1), torch.full((rows,), 3.0), atol=1e-4)


def test_curriculum_moves_from_lowest_to_highest_scores() -> None:
    scores = torch.arange(20.0).flip(0).unsqueeze(0)  # position t has score 19 - t
    valid = torch.ones(1, 20, dtype=torch.bool)
    picks = {}
    for progress in (0.0, 0.5, 1.0):
        mask = select_positions(scores, valid, 0.2, "curriculum", progress=progress)
        assert int(mask.sum()) == 4
        picks[progress] = sorted(scores[mask].tolist())
    assert picks[0.0] == [0.0, 1.0, 2.0, 3.0]  # the easiest (lowest-score) positions
    assert picks[0.5] == [8.0, 9.0, 10.0, 11.0]
    assert picks[1.0] == [16.0, 17.0, 18.0, 19.0]
    assert torch.equal(
        select_positions(scores, valid, 0.2, "curriculum", progress=1.0),
        select_positions(scores, valid, 0.2, "sequence"),
    )
    scores2, valid2 = _batch([40, 17, 1])
    for progress in (0.0, 0.3, 1.0):
        m = select_positions(scores2, valid2, 0.2, "curriculum", progress=progress)
        assert not (m & ~valid2).any()
        assert m.sum(-1).tolist() == [8, 4, 0]
    with pytest.raises(ValueError, match="progress"):
        select_positions(scores, valid, 0.2, "curriculum", progress=1.5)


def test_policy_argument_errors() -> None:
    scores, valid = _batch([10])
    with pytest.raises(ValueError, match="valid policies: sequence, batch, global"):
        get_policy("topk")
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        select_positions(scores, valid, 0.0)
    with pytest.raises(ValueError, match="bool"):
        select_positions(scores, valid.long(), 0.2)
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        select_positions(scores[:, :5], valid, 0.2)
    assert set(POLICIES) == {"sequence", "batch", "global", "stochastic", "curriculum", "none"}


def test_non_stochastic_weights_are_the_mask() -> None:
    scores, valid = _batch([30, 8])
    mask, weights = select_positions(scores, valid, 0.2, "sequence", return_weights=True)
    assert torch.equal(weights, mask.float())


# --------------------------------------------------------------------------- signals


def test_signals_compute_expected_scores() -> None:
    valid = torch.ones(2, 3, dtype=torch.bool)
    ent = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.5, 0.25]])
    s_ce = torch.tensor([[2.0, 2.0, 2.0], [1.0, 1.0, 1.0]])
    t_lp = torch.tensor([[-1.0, -0.5, -2.0], [-0.0, -1.0, -4.0]])
    calls = []

    def kl() -> torch.Tensor:
        calls.append("kl")
        return torch.full((2, 3), 0.7)

    inputs = SignalInputs(
        valid,
        student_entropy=ent,
        student_ce=s_ce,
        teacher_entropy=ent * 2,
        teacher_logprob=t_lp,
        kl=kl,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(compute_scores("student-entropy", inputs), ent)
    assert torch.equal(compute_scores("teacher-entropy", inputs), ent * 2)
    assert torch.equal(compute_scores("student-ce", inputs), s_ce)
    assert torch.equal(compute_scores("teacher-ce", inputs), -t_lp)
    ratio = compute_scores("ce-ratio", inputs)
    assert torch.allclose(ratio[0], torch.tensor([2.0, 4.0, 1.0]))
    assert ratio[1, 0] == pytest.approx(1.0 / 1e-6)  # teacher CE 0: floored denominator, finite
    assert not calls
    assert torch.equal(compute_scores("kl", inputs), torch.full((2, 3), 0.7)) and calls == ["kl"]
    r1 = compute_scores("random", inputs)
    inputs.generator = torch.Generator().manual_seed(0)
    assert torch.equal(compute_scores("random", inputs), r1)
    assert r1.shape == (2, 3) and ((r1 >= 0) & (r1 < 1)).all()


def test_signal_needs_and_missing_inputs() -> None:
    assert SIGNALS["student-entropy"].needs_student_entropy and SIGNALS["student-entropy"].needs_student_pass
    assert SIGNALS["ce-ratio"].needs_student_ce and SIGNALS["ce-ratio"].needs_teacher_logprob
    assert SIGNALS["teacher-entropy"].needs_teacher_entropy and not SIGNALS["teacher-entropy"].needs_student_pass
    assert SIGNALS["kl"].needs_kl and SIGNALS["reverse-kl"].needs_reverse_kl
    assert not any(
        [
            SIGNALS["random"].needs_student_pass,
            SIGNALS["random"].needs_kl,
            SIGNALS["random"].needs_teacher_entropy,
        ]
    )
    inputs = SignalInputs(torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="teacher_entropy"):
        compute_scores("teacher-entropy", inputs)
    with pytest.raises(ValueError, match="reverse_kl"):
        compute_scores("reverse-kl", inputs)
    with pytest.raises(ValueError, match="valid signals: student-entropy"):
        get_signal("entropy")


def test_signal_then_policy_end_to_end() -> None:
    scores, valid = _batch([40, 20])
    inputs = SignalInputs(valid, student_entropy=scores)
    signal, fraction = parse_select("student-entropy:0.2")
    mask = select_positions(compute_scores(signal, inputs), valid, fraction)
    assert mask.sum(-1).tolist() == [8, 4]

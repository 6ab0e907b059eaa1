"""Tests of selkd.trainer.losses: divergences on SparseTargets, reductions, chunking."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selkd.cache.classes import ClassSpec, teacher_outputs
from selkd.cache.targets import SparseTargets
from selkd.trainer import losses
from selkd.trainer.losses import (
    LOSSES,
    ce_per_position,
    chunked,
    fkl,
    get_loss,
    jsd,
    masked_mean,
    rkl,
    sequence_mean,
)


def _teacher(n: int = 6, v: int = 16, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale


def _targets(logits: torch.Tensor, spec: str, seed: int = 0) -> SparseTargets:
    nxt = torch.zeros(logits.shape[0], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    return teacher_outputs(logits, nxt, ClassSpec.parse(spec), generator=g).targets


def _ref_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of probability rows, with 0 log 0 = 0 (float64)."""
    p, q = p.double(), q.double()
    return torch.where(p > 0, p * (p.log() - q.log()), 0.0).sum(-1)


# --------------------------------------------------------------------------- zero at identity


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd"])
def test_identical_full_is_zero(name: str) -> None:
    t_logits = _teacher()
    targets = _targets(t_logits, "full")
    student = torch.log_softmax(t_logits, -1)  # student logits = teacher log-probs
    out = get_loss(name)(student, targets)
    assert out.dtype == torch.float32 and out.shape == (6,)
    assert torch.allclose(out, torch.zeros(6), atol=1e-6)


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("renorm", [False, True])
def test_identical_topk_with_tail_is_zero(name: str, renorm: bool) -> None:
    """Zero at the target: the teacher itself (with the tail), or, renormalised, a student with all its
    mass on the k classes in the teacher's proportions (the biased optimum)."""
    t_logits = _teacher()
    targets = _targets(t_logits, "topk:4")
    assert torch.all(targets.tail_logmass > -10)  # a real tail
    student = torch.log_softmax(t_logits, -1)
    if renorm:
        assert get_loss(name)(student, targets, topk_renormalize=True).min() > 1e-3  # its tail now costs
        kept = torch.log_softmax(targets.logprobs, -1)
        student = torch.full_like(student, -1e4).scatter(-1, targets.ids, kept)
    out = get_loss(name)(student, targets, topk_renormalize=renorm)
    assert torch.allclose(out, torch.zeros(6), atol=1e-6)


def test_identical_sample_fkl_is_zero_against_its_own_target() -> None:
    targets = _targets(_teacher(v=8), "sample:64")
    # a student equal to p~ on the stored ids (and ~0 elsewhere) has zero forward KL
    student = torch.full((6, 8), -1e4)
    slot = torch.isfinite(targets.logprobs)  # padding slots (id 0, -inf) must not overwrite a real id 0
    rows = torch.arange(6).unsqueeze(1).expand_as(slot)
    student[rows[slot], targets.ids[slot]] = targets.logprobs[slot]
    assert torch.allclose(fkl(student, targets), torch.zeros(6), atol=1e-5)


# --------------------------------------------------------------------------- exact values


def test_full_matches_reference() -> None:
    t_logits, s_logits = _teacher(seed=1), _teacher(seed=2)
    targets = _targets(t_logits, "full")
    p, q = t_logits.softmax(-1), s_logits.softmax(-1)
    m = 0.5 * (p + q)
    assert torch.allclose(fkl(s_logits, targets).double(), _ref_kl(p, q), atol=1e-5)
    assert torch.allclose(rkl(s_logits, targets).double(), _ref_kl(q, p), atol=1e-5)
    assert torch.allclose(jsd(s_logits, targets).double(), 0.5 * _ref_kl(p, m) + 0.5 * _ref_kl(q, m), atol=1e-5)


def test_topk_hand_computed_k_plus_one_buckets() -> None:
    # student q = [0.4, 0.3, 0.2, 0.1]; teacher top-2 ids [1, 2] with p = [0.5, 0.25], tail 0.25.
    # buckets: teacher [0.5, 0.25, 0.25], student [0.3, 0.2, 0.5 (= 0.4 + 0.1)].
    student = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    targets = SparseTargets(
        "topk", torch.tensor([[1, 2]]), torch.tensor([[0.5, 0.25]]).log(), torch.tensor([0.25]).log()
    )
    # fkl = 0.5 ln(0.5/0.3) + 0.25 ln(0.25/0.2) + 0.25 ln(0.25/0.5)
    #     = 0.2554128 + 0.0557859 - 0.1732868 = 0.1379119
    assert fkl(student, targets).item() == pytest.approx(0.1379119, abs=1e-6)
    # rkl = 0.3 ln(0.3/0.5) + 0.2 ln(0.2/0.25) + 0.5 ln(0.5/0.25)
    #     = -0.1532477 - 0.0446287 + 0.3465736 = 0.1486972
    assert rkl(student, targets).item() == pytest.approx(0.1486972, abs=1e-6)
    # jsd: m = [0.4, 0.225, 0.375]; KL(p||m) = 0.0365456, KL(q||m) = 0.0339798; jsd = 0.0352627
    assert jsd(student, targets).item() == pytest.approx(0.0352627, abs=1e-6)
    # renormalised teacher: buckets [2/3, 1/3, 0] against the student's own [0.3, 0.2, 0.5]
    # fkl = 2/3 ln((2/3)/0.3) + 1/3 ln((1/3)/0.2) = 0.5323385 + 0.1702752 = 0.7026137
    assert fkl(student, targets, topk_renormalize=True).item() == pytest.approx(0.7026137, abs=1e-6)
    # rkl: the empty teacher bucket is floored at e^-100:
    #     0.3 ln(0.3/(2/3)) + 0.2 ln(0.2/(1/3)) + 0.5 (ln 0.5 + 100) = 49.3117090
    assert rkl(student, targets, topk_renormalize=True).item() == pytest.approx(49.3117090, rel=1e-6)
    # jsd: m = [0.4833333, 0.2666667, 0.25]; 0.5 KL(p||m) + 0.5 KL(q||m) = 0.2173651
    assert jsd(student, targets, topk_renormalize=True).item() == pytest.approx(0.2173651, abs=1e-6)


def test_topk_tail_is_exact_when_student_tail_is_tiny() -> None:
    # student tail mass ~1e-9: log1p(-sum q_k) would lose it in fp32; the exact path keeps it
    student = torch.tensor([[0.0, 0.0, -25.0, -25.0]])
    q = student.double().softmax(-1)
    p_tail = 1e-3
    targets = SparseTargets(
        "topk",
        torch.tensor([[0, 1]]),
        torch.tensor([[math.log(0.5 - p_tail / 2)] * 2]),
        torch.tensor([math.log(p_tail)]),
    )
    ref_p = torch.tensor([0.5 - p_tail / 2, 0.5 - p_tail / 2, p_tail], dtype=torch.float64)
    ref_q = torch.stack([q[0, 0], q[0, 1], q[0, 2:].sum()])
    expected = _ref_kl(ref_p[None], ref_q[None]).item()
    assert fkl(student, targets).item() == pytest.approx(expected, rel=1e-4)


def test_temperature_divides_student_logits() -> None:
    t_logits, s_logits = _teacher(seed=3), _teacher(seed=4)
    targets = _targets(t_logits, "topk:5")
    for fn in LOSSES.values():
        assert torch.allclose(fn(s_logits, targets, temperature=2.0), fn(s_logits / 2.0, targets), atol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        fkl(s_logits, targets, temperature=0.0)


def test_bf16_student_logits_use_fp32_math() -> None:
    t_logits, s_logits = _teacher(seed=3), _teacher(seed=4)
    targets = _targets(t_logits, "full")
    out = fkl(s_logits.bfloat16(), targets)
    assert out.dtype == torch.float32
    assert torch.allclose(out, fkl(s_logits.bfloat16().float(), targets))


# --------------------------------------------------------------------------- student vocab > teacher vocab


def test_student_vocab_larger_than_teacher_full() -> None:
    c, v = 10, 12
    t_logits, s_logits = _teacher(v=c, seed=5), _teacher(v=v, seed=6)
    targets = _targets(t_logits, "full")
    p = F.pad(t_logits.softmax(-1), (0, v - c))  # teacher prob 0 on the padded ids
    q = s_logits.softmax(-1)
    # fkl: exact KL with the full student normaliser
    assert torch.allclose(fkl(s_logits, targets).double(), _ref_kl(p, q), atol=1e-5)
    # same as a full target over V whose extra columns are -inf (padding never NaNs)
    padded = SparseTargets("full", None, F.pad(targets.logprobs, (0, v - c), value=float("-inf")))
    assert torch.allclose(fkl(s_logits, targets), fkl(s_logits, padded), atol=1e-6)
    # rkl: student renormalised over the teacher's C classes
    q_c = s_logits[:, :c].softmax(-1)
    assert torch.allclose(rkl(s_logits, targets).double(), _ref_kl(q_c, p[:, :c]), atol=1e-5)
    # jsd: one extra bucket with teacher mass 0 == JSD over all V columns with p padded by zeros
    m = 0.5 * (p + q)
    assert torch.allclose(jsd(s_logits, targets).double(), 0.5 * _ref_kl(p, m) + 0.5 * _ref_kl(q, m), atol=1e-5)


def test_student_vocab_larger_than_teacher_topk() -> None:
    c, v = 10, 12
    t_logits, s_logits = _teacher(v=c, seed=7), _teacher(v=v, seed=8)
    targets = _targets(t_logits, "topk:3")
    q = s_logits.double().softmax(-1)
    p = t_logits.double().softmax(-1)
    ids = targets.ids
    p_b = torch.cat([p.gather(1, ids), 1 - p.gather(1, ids).sum(-1, keepdim=True)], -1)
    q_b = torch.cat([q.gather(1, ids), 1 - q.gather(1, ids).sum(-1, keepdim=True)], -1)  # tail has the extra ids
    assert torch.allclose(fkl(s_logits, targets).double(), _ref_kl(p_b, q_b), atol=1e-5)
    assert torch.allclose(rkl(s_logits, targets).double(), _ref_kl(q_b, p_b), atol=1e-5)


def test_teacher_vocab_larger_than_student_is_an_error() -> None:
    targets = _targets(_teacher(v=12), "full")
    with pytest.raises(ValueError, match="larger than the student"):
        fkl(_teacher(v=10), targets)


# --------------------------------------------------------------------------- RS-KD estimator


def test_rskd_gradient_is_unbiased_for_full_kd() -> None:
    v, draws, n = 20, 4000, 8
    t_logits = _teacher(n=1, v=v, seed=9, scale=1.5)
    s_logits = _teacher(n=1, v=v, seed=10)
    p = t_logits.softmax(-1)[0]
    # full KD gradient w.r.t. the student logits
    z = s_logits.clone().requires_grad_(True)
    fkl(z, _targets(t_logits, "full")).sum().backward()
    g_full = z.grad[0].clone()
    # 4000 independent sample:8 targets (one call, one seeded generator), the mean gradient
    out = teacher_outputs(
        t_logits.expand(draws, v),
        torch.zeros(draws, dtype=torch.long),
        ClassSpec("sample", n),
        generator=torch.Generator().manual_seed(11),
    )
    assert out.targets.mode == "sample" and out.targets.num_draws == n
    zs = s_logits.expand(draws, v).clone().requires_grad_(True)
    fkl(zs, out.targets).sum().backward()
    g_mean = zs.grad.mean(0)
    # per draw the gradient is q - p~ (p~ = counts / n), so the mean's error is mean(p~) - p, whose
    # standard error per class is sqrt(p (1 - p) / (n * draws)); allow 5 standard errors per class
    se = (p * (1 - p) / (n * draws)).sqrt()
    assert torch.all((g_mean - g_full).abs() <= 5 * se + 1e-6), (g_mean - g_full).abs() / se
    # and the estimator is genuinely noisy per draw (not trivially equal to full KD)
    assert (zs.grad - g_full).abs().max() > 0.05


# --------------------------------------------------------------------------- padding / NaN


@pytest.mark.parametrize("spec", ["sample:5", "topk:3", "full"])
def test_padding_never_gives_nan(spec: str) -> None:
    t1, t2 = _targets(_teacher(n=5, v=9, seed=12), spec), _targets(_teacher(n=3, v=9, seed=13), spec)
    stacked = SparseTargets.stack_padded([t1, t2], length=7)  # padded positions and padded slots
    valid = torch.zeros(2, 7, dtype=torch.bool)
    valid[0, :5] = True
    valid[1, :3] = True
    if spec.startswith("sample"):
        assert torch.isinf(stacked.logprobs[valid]).any()  # padding slots inside valid positions
    names = ["fkl"] if spec.startswith("sample") else ["fkl", "rkl", "jsd"]
    for name in names:
        z = _teacher(n=14, v=9, seed=14).requires_grad_(True)
        per_pos = get_loss(name)(z, stacked.flatten())
        assert torch.isfinite(per_pos).all()
        assert torch.all(per_pos.reshape(2, 7)[~valid] == 0)  # padded positions give exactly 0
        masked_mean(per_pos.reshape(2, 7), valid).backward()
        assert torch.isfinite(z.grad).all()
        assert torch.all(z.grad.reshape(2, 7, 9)[~valid] == 0)


def test_topk_padding_slot_sharing_a_real_id_changes_nothing() -> None:
    # a padding slot (id 0, -inf) next to a real class 0: same value and gradient as without it
    lp = torch.tensor([[math.log(0.5), math.log(0.2)]])
    tail = torch.tensor([math.log(0.3)])
    plain = SparseTargets("topk", torch.tensor([[0, 5]]), lp, tail)
    padded = SparseTargets(
        "topk", torch.tensor([[0, 0, 5, 0]]), torch.tensor([[lp[0, 0], -math.inf, lp[0, 1], -math.inf]]), tail
    )
    for name in ("fkl", "rkl", "jsd"):
        z1 = _teacher(n=1, v=8, seed=21).requires_grad_(True)
        z2 = z1.detach().clone().requires_grad_(True)
        a, b = get_loss(name)(z1, plain), get_loss(name)(z2, padded)
        assert torch.allclose(a, b, atol=1e-6)
        a.sum().backward()
        b.sum().backward()
        assert torch.allclose(z1.grad, z2.grad, atol=1e-6)


def test_topk_covering_whole_vocab_has_empty_tail() -> None:
    t_logits, s_logits = _teacher(v=6, seed=15), _teacher(v=6, seed=16)
    targets = _targets(t_logits, "topk:6")
    assert torch.all(torch.isinf(targets.tail_logmass))
    full = _targets(t_logits, "full")
    for name in ("fkl", "rkl", "jsd"):
        z = s_logits.clone().requires_grad_(True)
        out = get_loss(name)(z, targets)
        out.sum().backward()
        assert torch.isfinite(z.grad).all()
        assert torch.allclose(out, get_loss(name)(s_logits, full), atol=1e-5)


def test_sample_targets_reject_rkl_and_jsd() -> None:
    targets = _targets(_teacher(), "sample:10")
    for fn in (rkl, jsd):
        with pytest.raises(ValueError, match="sample targets only support fkl"):
            fn(_teacher(), targets)
    with pytest.raises(ValueError, match="topk_renormalize"):
        fkl(_teacher(), targets, topk_renormalize=True)


def test_registry_errors_list_valid_names() -> None:
    assert set(LOSSES) == {"fkl", "rkl", "jsd"}
    assert get_loss("rkl") is rkl
    with pytest.raises(ValueError, match="fkl, jsd, rkl"):
        get_loss("kl")


def test_shape_errors() -> None:
    targets = _targets(_teacher(n=6), "full")
    with pytest.raises(ValueError, match=r"leading shape \[N\]"):
        fkl(_teacher(n=5), targets)


# --------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("spec", ["sample:7", "topk:4", "full"])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_chunked_equals_unchunked(spec: str, checkpoint: bool) -> None:
    n, v = 11, 13
    targets = _targets(_teacher(n=n, v=v, seed=17), spec)
    names = ["fkl"] if spec.startswith("sample") else ["fkl", "rkl", "jsd"]
    for name in names:
        fn = get_loss(name)
        z1 = _teacher(n=n, v=v, seed=18).requires_grad_(True)
        z2 = z1.detach().clone().requires_grad_(True)
        ref = fn(z1, targets, temperature=1.5)
        out = chunked(fn, 4, checkpoint=checkpoint)(z2, targets, temperature=1.5)
        assert torch.allclose(out, ref, atol=1e-6)
        ref.square().sum().backward()
        out.square().sum().backward()
        assert torch.allclose(z1.grad, z2.grad, atol=1e-6)


def test_chunked_wraps_ce_and_handles_empty() -> None:
    z = _teacher(n=9, v=7, seed=19)
    labels = torch.tensor([0, 1, 2, 3, -100, 5, 6, 0, 1])
    assert torch.allclose(chunked(ce_per_position, 2)(z, labels), ce_per_position(z, labels))
    empty = chunked(fkl, 3)(z[:0], _targets(_teacher(n=0, v=7), "topk:2"))
    assert empty.shape == (0,)
    with pytest.raises(ValueError, match="chunk"):
        chunked(fkl, 0)


# --------------------------------------------------------------------------- CE and reductions


def test_ce_per_position() -> None:
    z = _teacher(n=4, v=5, seed=20).bfloat16()
    labels = torch.tensor([1, -100, 4, 0])
    out = ce_per_position(z, labels)
    assert out.dtype == torch.float32
    assert out[1] == 0
    ref = -torch.log_softmax(z.float(), -1)[[0, 2, 3], [1, 4, 0]]
    assert torch.allclose(out[[0, 2, 3]], ref)


def test_masked_mean_all_masked_is_zero_not_nan() -> None:
    values = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]], requires_grad=True)
    mask = torch.zeros(2, 2, dtype=torch.bool)
    out = masked_mean(values, mask)
    assert out.item() == 0.0
    out.backward()
    assert torch.all(values.grad == 0)
    assert sequence_mean(values.detach(), mask).item() == 0.0
    assert masked_mean(torch.zeros(0)).item() == 0.0


def test_masked_and_sequence_means() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0], [5.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[True, True, False, False], [False, False, False, True], [False] * 4])
    assert masked_mean(values, mask).item() == pytest.approx((1 + 2 + 40) / 3)
    assert masked_mean(values).item() == pytest.approx(values.mean().item())
    # L_1 = 1.5, L_2 = 40, sequence 3 has no selected position -> (1.5 + 40) / 2
    assert sequence_mean(values, mask).item() == pytest.approx((1.5 + 40) / 2)
    w = torch.tensor([[2.0, 0.0, 9.0, 9.0], [9.0, 9.0, 9.0, 1.0], [1.0] * 4])
    assert masked_mean(values, mask, w).item() == pytest.approx((2 + 0 + 40) / 3)
    assert sequence_mean(values, mask, w).item() == pytest.approx((1.0 + 40) / 2)


def test_module_exports() -> None:
    for name in losses.__all__:
        assert hasattr(losses, name)


# --------------------------------------------------------------------------- full KD's fused forward KL


def _brute_full_fkl(z: torch.Tensor, t_lp: torch.Tensor, temperature: float) -> torch.Tensor:
    """The formula before the fused path, per position: log_softmax, then sum over the C target classes
    of p (log p - log q) with 0 log 0 = 0, and 0 at positions whose teacher has no finite log-prob."""
    logq = torch.log_softmax(z.float() / temperature, dim=-1)[:, : t_lp.shape[1]]
    has = t_lp > float("-inf")
    per = torch.where(has, t_lp.exp() * (torch.where(has, t_lp, 0.0) - torch.where(has, logq, 0.0)), 0.0)
    return torch.where(has.any(-1), per.sum(-1), 0.0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("wrap", ["plain", "chunked", "chunked+checkpoint"])
def test_full_fkl_matches_brute_force_per_position(temperature: float, wrap: str) -> None:
    """Full KD's forward KL (gradient made in forward, never recomputed) equals the brute-force formula at
    every position, values and gradients: a student head wider than the targets (V > C), a padded
    position (teacher all -inf), a class the teacher gives 0, and a masked (-inf) student column there."""
    n, c, v = 9, 12, 15
    t_lp = torch.log_softmax(_teacher(n=n, v=c, seed=40), -1)
    t_lp[3] = float("-inf")  # a padded position: 0, no gradient
    t_lp[5, 7] = float("-inf")  # the teacher gives class 7 no mass here...
    z = _teacher(n=n, v=v, seed=41)
    z[5, 7] = float("-inf")  # ...and the student masks it: 0 log 0, not NaN
    z[:, c:] -= 3.0  # the student's extra (padded) columns
    targets = SparseTargets("full", None, t_lp)
    fn = {"plain": fkl, "chunked": chunked(fkl, 4), "chunked+checkpoint": chunked(fkl, 4, checkpoint=True)}[wrap]
    z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    out = fn(z1, targets, temperature=temperature)
    ref = _brute_full_fkl(z2, t_lp, temperature)
    assert torch.allclose(out, ref, atol=1e-6) and out[3] == 0
    weights = torch.linspace(0.5, 2.0, n)  # a per-position upstream gradient, as sequence_mean gives
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    assert torch.isfinite(z1.grad).all() and (z1.grad[3] == 0).all()
    assert torch.allclose(z1.grad, z2.grad, atol=1e-6)


def test_full_fkl_keeps_no_log_softmax_graph() -> None:
    """Full KD is not recomputed in backward: the chunked loss's autograd node is the fused one (its
    gradient was made in forward), not a checkpoint that would run the divergence again."""
    targets = _targets(_teacher(n=8, v=10, seed=42), "full")
    z = _teacher(n=8, v=10, seed=43).requires_grad_(True)
    out = chunked(fkl, 3, checkpoint=True)(z, targets)
    assert type(out.grad_fn).__name__ == "_FullForwardKLBackward"
    with torch.no_grad():  # evaluation: no gradient buffer, same values
        assert torch.allclose(chunked(fkl, 3)(z, targets), out.detach(), atol=1e-6)


def test_full_fkl_gradient_in_the_logits_dtype() -> None:
    """bf16 logits (autocast on GPU): the kept gradient is bf16 (as much memory as the logits) and equals
    the fp32 one to bf16 precision."""
    targets = _targets(_teacher(n=6, v=32, seed=44), "full")
    z32 = _teacher(n=6, v=32, seed=45).requires_grad_(True)
    z16 = z32.detach().bfloat16().requires_grad_(True)
    fkl(z32, targets).sum().backward()
    fkl(z16, targets).sum().backward()
    assert z16.grad.dtype == torch.bfloat16
    assert torch.allclose(z16.grad.float(), z32.grad, atol=1e-2)

"""Distillation losses on :class:`~selkd.cache.targets.SparseTargets` (pure functions, fp32 math).

Every divergence has the signature ``fn(student_logits [N, V], targets [N], *, temperature=1.0,
topk_renormalize=False) -> [N] float32``: one value per position, no reduction. Reductions are
separate (:func:`masked_mean`, :func:`sequence_mean`) and so is chunking (:func:`chunked` wraps any
per-position function). Names are looked up in the :data:`LOSSES` registry with :func:`get_loss`.

How each target mode is matched (teacher ``p``, student ``q = softmax(student_logits / T)`` over
the student's full vocabulary ``V``):

* ``sample`` (RS-KD): ``sum_v p~_v (log p~_v - log q_v)`` over the stored ids, ``p~ = count / N``.
  Its gradient ``-sum_v p~_v grad log q_v`` is an unbiased estimate of full KD's gradient because
  ``E[p~] = p``. Only forward KL is defined: the sampled target has zero mass outside its ids, so a
  reverse KL or JSD against it would push the student to zero everywhere else (biased, and infinite
  for reverse KL); :func:`rkl` and :func:`jsd` raise ``ValueError`` on sample targets.
* ``topk`` with a tail: ``k + 1`` buckets, the ``k`` stored classes and one tail bucket holding the
  teacher mass ``exp(tail_logmass)`` and the student mass outside the ``k`` ids. The student's tail
  log-mass is computed *exactly* as a log-sum-exp over the complement of the ids (not as
  ``log1p(-sum q_k)``, which loses all precision in fp32 when the tail is small). An empty tail
  (``-inf``) contributes 0.
  ``topk_renormalize=True`` is the biased baseline (the "top-k KD" of the RS-KD paper): the teacher's
  ``k`` probabilities renormalised to sum to 1, so its tail bucket has no mass, against the student's
  full distribution (its true tail bucket). The optimum puts all of the student's mass on the ``k``
  classes: it teaches overconfidence. (Renormalising the student over the ``k`` classes as well would
  leave its tail mass free, with no gradient at all.)
* ``full``: the exact divergence over all classes. Targets cover the ``C`` real classes (the tokenizer's
  tokens; a teacher's padded head rows are dropped when targets are made, :mod:`selkd.cache.classes`), and
  a student head is usually padded too (Qwen2.5-0.5B: 151,936 rows for 151,665 tokens), so the extra
  ``V - C`` student columns are classes the teacher gives probability 0:

  - ``fkl``: they only enter through the normaliser of ``log q`` (exact KL; its gradient pushes
    their mass down).
  - ``rkl``: a zero-probability teacher class makes reverse KL infinite, so the student is
    renormalised over the teacher's ``C`` classes (the padded ids are never real tokens).
  - ``jsd``: the extra columns form one extra bucket with teacher mass 0 (JSD stays finite and the
    student is pushed to put no mass there).

  In ``topk`` mode the extra columns simply belong to the student's tail bucket, and in ``sample`` mode
  they enter through the normaliser of ``log q``: every mode pushes the student's padded mass to 0.
  Student logits of ``-inf`` there (a head that masks its padding) are safe in all of them.

Padding: slots with teacher log-prob ``-inf`` (sample padding, ``stack_padded`` padding) contribute
exactly 0 with finite gradients; positions whose teacher has no finite log-prob at all (padded
positions) give 0. Reverse KL floors teacher log-probs at :data:`TEACHER_LOGPROB_FLOOR` so that a
bucket the teacher gives no mass (a ``-inf`` tail when ``k`` covers the teacher vocabulary) costs a
large but finite amount instead of ``inf``.

Temperature divides the student logits only: the targets already carry the teacher temperature. The
caller applies any ``T**2`` gradient scaling.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from selkd.cache.targets import SparseTargets

__all__ = [
    "LOSSES",
    "TEACHER_LOGPROB_FLOOR",
    "LossFn",
    "ce_per_position",
    "chunked",
    "fkl",
    "get_loss",
    "jsd",
    "masked_mean",
    "rkl",
    "sequence_mean",
]

LossFn = Callable[..., torch.Tensor]

TEACHER_LOGPROB_FLOOR = -100.0  # reverse KL only: log p below this is treated as this (e^-100 ~ 4e-44)
_NEG_INF = float("-inf")


# --------------------------------------------------------------------------- -inf-safe primitives


def _finite_rows_lse(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim; rows that are all ``-inf`` give ``-inf`` with zero (not NaN)
    gradient. x: [N, K] -> [N]."""
    empty = ~(x > _NEG_INF).any(-1)
    safe = x.masked_fill(empty.unsqueeze(-1), 0.0)
    return torch.logsumexp(safe, dim=-1).masked_fill(empty, _NEG_INF)


def _log_normalize(x: torch.Tensor) -> torch.Tensor:
    """Log-space renormalisation over the last dim, keeping ``-inf`` entries ``-inf``. [N, K]."""
    has = x > _NEG_INF
    lse = _finite_rows_lse(x)
    safe_lse = lse.masked_fill(~(lse > _NEG_INF), 0.0).unsqueeze(-1)
    return torch.where(has, torch.where(has, x, 0.0) - safe_lse, _NEG_INF)


def _kl_buckets(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) over buckets from log-probs [N, K] (``-inf`` allowed) -> [N].

    Buckets with ``P = 0`` contribute exactly 0 and pass no gradient; no NaN is produced anywhere.
    """
    has = log_p > _NEG_INF
    lp = torch.where(has, log_p, 0.0)
    lq = torch.where(has, log_q, 0.0)
    p = torch.where(has, lp.exp(), 0.0)
    return (p * (lp - lq)).sum(-1)


def _jsd_buckets(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised JSD: beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q. [N, K] -> [N]."""
    both_empty = ~(log_p > _NEG_INF) & ~(log_q > _NEG_INF)
    lp = log_p.masked_fill(both_empty, 0.0)
    lq = log_q.masked_fill(both_empty, 0.0)
    log_m = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
    log_m = log_m.masked_fill(both_empty, _NEG_INF)
    return beta * _kl_buckets(log_p, log_m) + (1.0 - beta) * _kl_buckets(log_q, log_m)


def _student_logq(student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """[N, V] any dtype -> [N, V] float32 log-softmax at ``temperature``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = student_logits.float()
    if temperature != 1.0:
        z = z / temperature
    return torch.log_softmax(z, dim=-1)


def _check(student_logits: torch.Tensor, targets: SparseTargets) -> None:
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got {tuple(student_logits.shape)}")
    if len(targets.shape) != 1 or targets.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"targets must have leading shape [N] = [{student_logits.shape[0]}], got {tuple(targets.shape)}; "
            "use targets.select(mask) or targets.flatten()"
        )
    if targets.mode == "full" and targets.num_classes > student_logits.shape[1]:
        raise ValueError(
            f"full targets over {targets.num_classes} classes are larger than the student's head "
            f"({student_logits.shape[1]} rows)"
        )


def _position_valid(targets: SparseTargets) -> torch.Tensor:
    """[N] bool: the teacher has some finite log-prob at this position (not a padded position)."""
    ok = (targets.logprobs > _NEG_INF).any(-1)
    if targets.tail_logmass is not None:
        ok = ok | (targets.tail_logmass > _NEG_INF)
    return ok


def _topk_buckets(logq: torch.Tensor, targets: SparseTargets, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probs on the k (+1 tail) buckets of topk targets: ([N, K'], [N, K'])."""
    assert targets.ids is not None and targets.tail_logmass is not None
    ids = targets.ids
    t_lp = targets.logprobs.float()
    slot = t_lp > _NEG_INF  # padding slots (id 0, logprob -inf) are not buckets
    s_lp = logq.gather(-1, ids).masked_fill(~slot, _NEG_INF)
    # mark the stored ids; padding slots point at the row's first real id so that every write to a
    # column carries the same value (a plain scatter with duplicate indices is order-dependent)
    any_slot = slot.any(-1, keepdim=True)
    first = ids.gather(-1, slot.to(torch.uint8).argmax(-1, keepdim=True))
    in_set = torch.zeros(logq.shape, dtype=torch.bool, device=logq.device)
    in_set.scatter_(-1, torch.where(slot, ids, first), any_slot.expand_as(slot))
    s_tail = _finite_rows_lse(logq.masked_fill(in_set, _NEG_INF))
    t_tail = targets.tail_logmass.float().unsqueeze(-1)
    if renormalize:  # the biased target: the k classes hold all of the teacher's mass
        t_lp, t_tail = _log_normalize(t_lp), torch.full_like(t_tail, _NEG_INF)
    t_all = torch.cat([t_lp, t_tail], dim=-1)
    s_all = torch.cat([s_lp, s_tail.unsqueeze(-1)], dim=-1)
    return t_all, s_all


def _finish(values: torch.Tensor, targets: SparseTargets) -> torch.Tensor:
    return torch.where(_position_valid(targets), values, 0.0)


# --------------------------------------------------------------------------- divergences


def fkl(
    student_logits: torch.Tensor,
    targets: SparseTargets,
    *,
    temperature: float = 1.0,
    topk_renormalize: bool = False,
) -> torch.Tensor:
    """Forward KL(p || q) per position.

    student_logits: [N, V] any float dtype (math in fp32); targets: leading shape [N].
    Returns [N] float32 (0 at padded positions). See the module docstring for each target mode.
    ``topk_renormalize`` applies to topk targets only (a no-op for full; an error for sample).
    """
    _check(student_logits, targets)
    if targets.mode == "full":
        return _full_fkl(student_logits, targets.logprobs, temperature, max(student_logits.shape[0], 1))
    logq = _student_logq(student_logits, temperature)
    t_lp = targets.logprobs.float()
    if targets.mode == "sample":
        if topk_renormalize:
            raise ValueError("topk_renormalize applies to topk targets, not sample targets")
        assert targets.ids is not None
        values = _kl_buckets(t_lp, logq.gather(-1, targets.ids))
    else:
        values = _kl_buckets(*_topk_buckets(logq, targets, topk_renormalize))
    return _finish(values, targets)


def _full_fkl_rows(
    z: torch.Tensor, t_lp: torch.Tensor, temperature: float, grad: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p || q) of ``c`` rows against full targets, and its gradient's row scale. z: [c, V]; t_lp: [c, C].

    ``d KL / d z = (s q - p) / T`` with ``s = sum p`` (1 up to the float16 rounding of a stored target;
    exact for any s): when ``grad`` [c, V] is given, ``q - p / s`` is written there (p is 0 on the
    student's extra columns) and the returned scale [c] is ``s / T``, 0 at a padded position (the
    teacher has no finite log-prob), so that backward is one multiply. Returns (values [c] float32, 0 at a
    padded position; scale [c] float32)."""
    zt = z.float() if temperature == 1.0 else z.float() / temperature
    into = grad is not None and grad.dtype == torch.float32  # fp32 logits: the log-softmax is made in place of
    logq = torch.log_softmax(zt, -1, out=grad) if into else torch.log_softmax(zt, -1)  # its gradient, no copy
    has = t_lp > _NEG_INF
    lp = torch.where(has, t_lp.float(), 0.0)
    p = torch.where(has, lp.exp(), 0.0)  # [c, C]
    lq = logq[:, : t_lp.shape[1]].masked_fill(~has, 0.0)  # a -inf student logit where p = 0 costs 0, not NaN
    valid = has.any(-1)
    values = torch.where(valid, torch.linalg.vecdot(p, lp - lq), 0.0)
    mass = p.sum(-1)
    if grad is not None:
        q = logq.exp_()  # in place: logq is not needed any more
        q[:, : t_lp.shape[1]] -= p.div_(mass.clamp_min(torch.finfo(p.dtype).tiny).unsqueeze(-1))
        if not into:
            grad.copy_(q)  # into the logits' dtype
    return values, torch.where(valid, mass / temperature, 0.0)


class _FullForwardKL(torch.autograd.Function):
    """Forward KL against full targets that makes its gradient in the forward pass: the student's
    log-softmax is taken once per chunk, and ``q - p / s`` is kept ([N, V], the logits' dtype) with a
    row scale instead of the log-softmax's autograd graph (:func:`_full_fkl_rows`). Backward is one
    multiply, nothing is recomputed; the price is one logits-sized tensor held until backward (see
    :func:`chunked`)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, t_lp: torch.Tensor, temperature: float, chunk: int) -> torch.Tensor:
        grad = torch.empty_like(z)
        rows = range(0, max(z.shape[0], 1), chunk)
        parts = [_full_fkl_rows(z[s : s + chunk], t_lp[s : s + chunk], temperature, grad[s : s + chunk]) for s in rows]
        values, scale = (torch.cat(x) for x in zip(*parts, strict=True))
        ctx.save_for_backward(grad, scale)
        return values

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        grad, scale = ctx.saved_tensors
        return grad * (g * scale).unsqueeze(-1).to(grad.dtype), None, None, None


def _full_fkl(z: torch.Tensor, t_lp: torch.Tensor, temperature: float, chunk: int) -> torch.Tensor:
    """Forward KL against full targets ``t_lp`` [N, C], ``chunk`` rows at a time. z: [N, V] -> [N] float32."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if torch.is_grad_enabled() and z.requires_grad:
        return _FullForwardKL.apply(z, t_lp, temperature, chunk)
    rows = range(0, max(z.shape[0], 1), chunk)
    return torch.cat([_full_fkl_rows(z[s : s + chunk], t_lp[s : s + chunk], temperature, None)[0] for s in rows])


def _reverse_buckets(
    student_logits: torch.Tensor,
    targets: SparseTargets,
    temperature: float,
    topk_renormalize: bool,
    name: str,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(teacher, student) bucket log-probs for rkl / jsd, and whether the student has an extra bucket
    (full targets with C < V, used by jsd)."""
    _check(student_logits, targets)
    if targets.mode == "sample":
        raise ValueError(
            f"{name}: rkl/jsd need topk or full targets; sample targets only support fkl "
            "(the sampled target has zero mass outside its ids)"
        )
    logq = _student_logq(student_logits, temperature)
    if targets.mode == "topk":
        t, s = _topk_buckets(logq, targets, topk_renormalize)
        return t, s, False
    return targets.logprobs.float(), logq, targets.num_classes < logq.shape[1]


def rkl(
    student_logits: torch.Tensor,
    targets: SparseTargets,
    *,
    temperature: float = 1.0,
    topk_renormalize: bool = False,
) -> torch.Tensor:
    """Reverse KL(q || p) per position on the same buckets as :func:`fkl` (topk: k + 1; full: exact).

    student_logits: [N, V]; targets: leading shape [N], topk or full (sample raises ValueError).
    Returns [N] float32. Full targets with C < V: the student is renormalised over the teacher's C
    classes. Teacher log-probs are floored at :data:`TEACHER_LOGPROB_FLOOR`.
    """
    t, s, extra = _reverse_buckets(student_logits, targets, temperature, topk_renormalize, "rkl")
    if extra:
        s = torch.log_softmax(s[:, : targets.num_classes], dim=-1)  # log q renormalised over C
    t = t.clamp_min(TEACHER_LOGPROB_FLOOR)
    return _finish(_kl_buckets(s, t), targets)


def jsd(
    student_logits: torch.Tensor,
    targets: SparseTargets,
    *,
    temperature: float = 1.0,
    topk_renormalize: bool = False,
    beta: float = 0.5,
) -> torch.Tensor:
    """Jensen-Shannon divergence per position: ``beta KL(p || m) + (1 - beta) KL(q || m)`` with
    ``m = beta p + (1 - beta) q`` (beta = 0.5: the symmetric JSD, bounded by log 2).

    student_logits: [N, V]; targets: leading shape [N], topk or full (sample raises ValueError).
    Returns [N] float32. Full targets with C < V: the extra student columns form one bucket with
    teacher mass 0.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
    t, s, extra = _reverse_buckets(student_logits, targets, temperature, topk_renormalize, "jsd")
    if extra:
        c = targets.num_classes
        s_extra = _finite_rows_lse(s[:, c:]).unsqueeze(-1)  # all -inf (a masked padding): -inf, no NaN grad
        t = torch.cat([t, torch.full_like(s_extra, _NEG_INF)], dim=-1)
        s = torch.cat([s[:, :c], s_extra], dim=-1)
    return _finish(_jsd_buckets(t, s, beta), targets)


LOSSES: dict[str, LossFn] = {"fkl": fkl, "rkl": rkl, "jsd": jsd}


def get_loss(name: str) -> LossFn:
    """The divergence registered as ``name`` (``fkl``, ``rkl``, ``jsd``)."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}") from None


# --------------------------------------------------------------------------- CE and reductions


def ce_per_position(student_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy ``-log q(label)`` per position. student_logits: [N, V] (fp32 math);
    labels: [N] int64. Returns [N] float32, 0 where ``labels == ignore_index``."""
    return F.cross_entropy(student_logits.float(), labels, reduction="none", ignore_index=ignore_index)


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor | None = None, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """``sum(values * weights over mask) / mask.sum().clamp_min(1)`` -> scalar float32.

    values: [N] or [B, L]; mask: same shape, bool (None: every entry); weights: same shape, optional
    per-entry weights (e.g. importance weights with mean 1 over the selected entries). Masked entries
    may hold anything (inf / NaN included): they are dropped with ``where``, never multiplied.
    All-masked gives exactly 0.
    """
    values = values.float()
    if weights is not None:
        values = values * weights.float()
    if mask is None:
        return values.sum() / max(values.numel(), 1)
    mask = mask.bool()
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp_min(1)


def sequence_mean(values: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's two-level mean: ``L_i = sum_t m_t l_t / sum_t m_t`` per sequence, then the mean of
    ``L_i`` over the sequences with at least one selected position.

    values, mask (bool), weights (optional): [B, L]. Returns a scalar float32; all-masked gives 0.
    """
    if values.dim() != 2 or mask.shape != values.shape:
        raise ValueError(f"sequence_mean needs values and mask [B, L], got {tuple(values.shape)}, {tuple(mask.shape)}")
    values = values.float()
    if weights is not None:
        values = values * weights.float()
    mask = mask.bool()
    count = mask.sum(-1)
    per_seq = torch.where(mask, values, 0.0).sum(-1) / count.clamp_min(1)
    has = count > 0
    return torch.where(has, per_seq, 0.0).sum() / has.sum().clamp_min(1)


# --------------------------------------------------------------------------- chunking


def _rows(x: Any, start: int, end: int) -> Any:
    if isinstance(x, (SparseTargets, torch.Tensor)):
        return x.select(slice(start, end)) if isinstance(x, SparseTargets) else x[start:end]
    return x


def _makes_own_gradient(loss_fn: LossFn, args: tuple[Any, ...]) -> bool:
    """Whether ``loss_fn(logits, *args)`` is forward KL on full targets, which :func:`chunked` hands to
    :class:`_FullForwardKL` whole (it chunks itself and makes its gradient in forward)."""
    return loss_fn is fkl and len(args) == 1 and isinstance(args[0], SparseTargets) and args[0].mode == "full"


def chunked(loss_fn: LossFn, chunk: int, checkpoint: bool = False) -> LossFn:
    """Wrap a per-position function ``loss_fn(student_logits [N, V], other [N, ...], **kw) -> [N]``
    (a divergence, :func:`ce_per_position`, ...) so that it runs ``chunk`` rows at a time: each chunk
    builds its fp32 ``[chunk, V]`` log-softmax alone. Positional tensor / SparseTargets arguments are
    split along their first dim; keyword arguments are passed unchanged. The result equals the
    unchunked one.

    ``checkpoint=True`` also recomputes each chunk in backward (``torch.utils.checkpoint``), so the
    fp32 ``[N, V]`` temporaries are not kept alive for the backward pass either.

    The one exception, the rule for where recomputing does not pay: forward KL on full targets (full KD:
    every position's logits are there) is never checkpointed. It makes its gradient ``(q - p) / T`` in
    the forward pass (:class:`_FullForwardKL`), one log-softmax per chunk and one multiply in backward,
    instead of building the divergence twice; it holds one ``[N, V]`` tensor in the logits' dtype until
    backward, as much as the logits themselves.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")

    @functools.wraps(loss_fn)
    def run(student_logits: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if _makes_own_gradient(loss_fn, args):
            _check(student_logits, args[0])
            return _full_fkl(student_logits, args[0].logprobs, kwargs.get("temperature", 1.0), chunk)
        n = student_logits.shape[0]
        parts = []
        # one split node: its backward joins the chunks' gradients once (slicing would add a zero-filled
        # [N, V] gradient per chunk)
        pieces = student_logits.split(chunk) if n else (student_logits,)
        for s, logits in zip(range(0, max(n, 1), chunk), pieces, strict=True):
            e = min(s + chunk, n)
            piece = (logits, *(_rows(a, s, e) for a in args))
            if checkpoint and torch.is_grad_enabled() and student_logits.requires_grad:
                parts.append(_checkpoint(loss_fn, *piece, use_reentrant=False, **kwargs))
            else:
                parts.append(loss_fn(*piece, **kwargs))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    return run

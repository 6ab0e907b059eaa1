"""Position selection: which positions get a distillation loss (``--select`` / ``--select-policy``).

A *signal* scores every position (``[B, L]`` float32, higher = more important); a *policy* turns the
scores, the valid-position mask and a fraction into a selection mask (and, for the stochastic policy,
importance weights). Both are registries: :data:`SIGNALS` and :data:`POLICIES`.

``--select`` is ``SIGNAL:FRACTION`` (``student-entropy:0.2``, the SE-KD default) or ``none`` (full
KD: every valid position), parsed by :func:`selkd.trainer.spec.parse_select`; the registries here are
keyed by the names :mod:`selkd.trainer.spec` lists (the CLI reads those without torch). Signals
declare which inputs they need (:class:`Signal`), so the training loop computes only those: student
entropy / CE come from one chunked no-grad pass of the student's head, teacher entropy and teacher
next-token log-prob come from the cache, KL / reverse KL are computed lazily by a callable the loop
provides (e.g. ``head.chunked_divergence``).

Policies (``fraction`` = f, ``n`` = number of valid positions of a sequence):

* ``sequence``: per sequence, the top ``ceil(f * n)`` valid positions; ties go to the earlier
  position (deterministic).
* ``batch``: the top ``ceil(f * N)`` over all ``N`` valid positions of the batch.
* ``global`` (GLS): a FIFO queue of the most recent valid scores (:class:`GlobalQueue`, default
  30,000); the batch's scores are pushed first, then the threshold is the ``ceil(f * len(queue))``-th
  largest queued score and every valid position with ``score >= threshold`` is selected. Its state is
  per process (under DDP each rank keeps its own queue) and checkpointable.
* ``stochastic``: per sequence, ``ceil(f * n)`` positions drawn without replacement with probability
  proportional to the score (Gumbel-top-k). Scores are shifted so the smallest valid one is 0 when any
  is negative, and floored at a tiny positive weight. Optional importance weights correct towards the
  full-KD mean: ``1 / pi`` with ``pi = min(1, k * w / sum w)`` (the first-order inclusion
  probability), normalised to mean 1 over each sequence's selected positions (self-normalised).
* ``curriculum``: per sequence, a window of ``ceil(f * n)`` consecutive ranks slides from the
  lowest-scoring positions (``progress = 0``: the easiest, e.g. where the student is most certain) to
  the highest-scoring ones (``progress = 1``: identical to ``sequence``), linearly in ``progress``:
  the window starts at rank ``round((1 - progress) * (n - k))`` counted from the top.
* ``none``: every valid position (full KD).

Invalid positions are never selected by any policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch

from selkd.trainer.spec import DEFAULT_GLOBAL_CAPACITY

__all__ = [
    "DEFAULT_GLOBAL_CAPACITY",
    "POLICIES",
    "SIGNALS",
    "GlobalQueue",
    "Signal",
    "SignalInputs",
    "compute_scores",
    "get_policy",
    "get_signal",
    "make_policy_state",
    "select_positions",
    "selection_budget",
]

_CE_EPS = 1e-6  # ce-ratio denominator floor (teacher CE can be ~0 where the teacher is certain)
_MIN_WEIGHT = 1e-12  # stochastic policy: floor of the sampling weight


# --------------------------------------------------------------------------- signals


@dataclass
class SignalInputs:
    """What signals may read. Tensors are [B, L] float32 aligned with the next-token positions.

    valid:            [B, L] bool, positions that have a next token (and a teacher target).
    student_entropy:  student entropy at temperature 1 (no grad), or None if not computed.
    student_ce:       student -log q(next token) (no grad), or None.
    teacher_entropy:  cached teacher entropy at temperature 1, or None.
    teacher_logprob:  cached teacher log p(next token) at temperature 1, or None.
    kl:               callable returning KL(p || q) per position [B, L] (computed lazily), or None.
    reverse_kl:       callable returning KL(q || p) per position [B, L], or None.
    generator:        for the ``random`` signal.
    """

    valid: torch.Tensor
    student_entropy: torch.Tensor | None = None
    student_ce: torch.Tensor | None = None
    teacher_entropy: torch.Tensor | None = None
    teacher_logprob: torch.Tensor | None = None
    kl: Callable[[], torch.Tensor] | None = None
    reverse_kl: Callable[[], torch.Tensor] | None = None
    generator: torch.Generator | None = None


def _need(inputs: SignalInputs, field: str, signal: str, where: str) -> Any:
    value = getattr(inputs, field)
    if value is None:
        raise ValueError(f"signal {signal!r} needs SignalInputs.{field} ({where}); it is None")
    return value


def _student_entropy(x: SignalInputs) -> torch.Tensor:
    return _need(x, "student_entropy", "student-entropy", "student head pass")


def _teacher_entropy(x: SignalInputs) -> torch.Tensor:
    return _need(x, "teacher_entropy", "teacher-entropy", "cached teacher scalars")


def _student_ce(x: SignalInputs) -> torch.Tensor:
    return _need(x, "student_ce", "student-ce", "student head pass")


def _teacher_ce(x: SignalInputs) -> torch.Tensor:
    return -_need(x, "teacher_logprob", "teacher-ce", "cached teacher scalars")


def _ce_ratio(x: SignalInputs) -> torch.Tensor:
    s = _need(x, "student_ce", "ce-ratio", "student head pass")
    t = -_need(x, "teacher_logprob", "ce-ratio", "cached teacher scalars")
    return s / t.clamp_min(_CE_EPS)


def _kl(x: SignalInputs) -> torch.Tensor:
    return _need(x, "kl", "kl", "a callable computing KL(p || q) per position")()


def _reverse_kl(x: SignalInputs) -> torch.Tensor:
    return _need(x, "reverse_kl", "reverse-kl", "a callable computing KL(q || p); needs topk/full targets")()


def _random(x: SignalInputs) -> torch.Tensor:
    g = x.generator
    device = g.device if g is not None else x.valid.device
    return torch.rand(tuple(x.valid.shape), generator=g, device=device).to(x.valid.device)


@dataclass(frozen=True)
class Signal:
    """A registered importance signal: ``fn(inputs) -> [B, L]`` (higher = more important) and the
    inputs it needs, so the loop computes only those."""

    name: str
    fn: Callable[[SignalInputs], torch.Tensor]
    needs_student_entropy: bool = False
    needs_student_ce: bool = False
    needs_teacher_entropy: bool = False
    needs_teacher_logprob: bool = False
    needs_kl: bool = False
    needs_reverse_kl: bool = False

    @property
    def needs_student_pass(self) -> bool:
        """Whether the loop must run the chunked no-grad student head pass (entropy / CE)."""
        return self.needs_student_entropy or self.needs_student_ce

    def scores(self, inputs: SignalInputs) -> torch.Tensor:
        """Scores [B, L] float32; NaN becomes -inf (never preferred)."""
        scores = self.fn(inputs).float()
        if scores.shape != inputs.valid.shape:
            raise ValueError(
                f"signal {self.name!r} gave shape {tuple(scores.shape)}, expected {tuple(inputs.valid.shape)}"
            )
        return torch.nan_to_num(scores, nan=float("-inf"))


SIGNALS: dict[str, Signal] = {
    s.name: s
    for s in (
        Signal("student-entropy", _student_entropy, needs_student_entropy=True),
        Signal("teacher-entropy", _teacher_entropy, needs_teacher_entropy=True),
        Signal("student-ce", _student_ce, needs_student_ce=True),
        Signal("teacher-ce", _teacher_ce, needs_teacher_logprob=True),
        Signal("ce-ratio", _ce_ratio, needs_student_ce=True, needs_teacher_logprob=True),
        Signal("kl", _kl, needs_kl=True),
        Signal("reverse-kl", _reverse_kl, needs_reverse_kl=True),
        Signal("random", _random),
    )
}


def get_signal(name: str) -> Signal:
    try:
        return SIGNALS[name]
    except KeyError:
        raise ValueError(f"unknown selection signal {name!r}; valid signals: {', '.join(SIGNALS)}") from None


def compute_scores(name: str, inputs: SignalInputs) -> torch.Tensor:
    """Scores [B, L] float32 of signal ``name`` (:meth:`Signal.scores`)."""
    return get_signal(name).scores(inputs)


# --------------------------------------------------------------------------- policies


def selection_budget(n: torch.Tensor, fraction: float) -> torch.Tensor:
    """``ceil(fraction * n)`` per entry of ``n`` (int64), at least 1 where ``n > 0``, at most ``n``.
    A 1e-6 slack keeps float error from rounding an exact product up (0.1 * 30 -> 3, not 4)."""
    k = torch.ceil(n.double() * fraction - 1e-6).long()
    return torch.minimum(torch.maximum(k, (n > 0).long()), n)


def _order(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[R, M] indices ordering each row: valid positions first by score descending (ties: earlier
    index first), then invalid positions."""
    keys = torch.where(valid, scores, float("-inf"))
    order = torch.argsort(keys, dim=-1, descending=True, stable=True)
    v = valid.gather(-1, order).to(torch.uint8)
    return order.gather(-1, torch.argsort(v, dim=-1, descending=True, stable=True))


def _take_ranks(order: torch.Tensor, start: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mask [R, M] with the positions at ranks ``[start, start + count)`` of ``order`` per row."""
    ranks = torch.arange(order.shape[-1], device=order.device).unsqueeze(0)
    take = (ranks >= start.unsqueeze(-1)) & (ranks < (start + count).unsqueeze(-1))
    return torch.zeros_like(take).scatter(-1, order, take)


PolicyResult = tuple[torch.Tensor, torch.Tensor | None]


def _policy_none(scores: torch.Tensor, valid: torch.Tensor, fraction: float, **_: Any) -> PolicyResult:
    return valid.clone(), None


def _policy_sequence(scores: torch.Tensor, valid: torch.Tensor, fraction: float, **_: Any) -> PolicyResult:
    k = selection_budget(valid.sum(-1), fraction)
    return _take_ranks(_order(scores, valid), torch.zeros_like(k), k), None


def _policy_batch(scores: torch.Tensor, valid: torch.Tensor, fraction: float, **_: Any) -> PolicyResult:
    flat_valid = valid.reshape(1, -1)
    k = selection_budget(flat_valid.sum(-1), fraction)
    mask = _take_ranks(_order(scores.reshape(1, -1), flat_valid), torch.zeros_like(k), k)
    return mask.reshape(valid.shape), None


def _policy_curriculum(
    scores: torch.Tensor, valid: torch.Tensor, fraction: float, *, progress: float = 0.0, **_: Any
) -> PolicyResult:
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"curriculum progress must be in [0, 1], got {progress}")
    n = valid.sum(-1)
    k = selection_budget(n, fraction)
    start = torch.round((1.0 - progress) * (n - k).double()).long()
    return _take_ranks(_order(scores, valid), start, k), None


def _policy_stochastic(
    scores: torch.Tensor,
    valid: torch.Tensor,
    fraction: float,
    *,
    generator: torch.Generator | None = None,
    **_: Any,
) -> PolicyResult:
    s = torch.where(valid, scores.float(), 0.0)
    s = torch.where(torch.isfinite(s), s, 0.0)
    lowest = torch.where(valid, s, float("inf")).amin(-1, keepdim=True)
    shift = torch.where(lowest < 0, lowest, 0.0)
    w = torch.where(valid, (s - shift).clamp_min(_MIN_WEIGHT), 0.0)
    device = generator.device if generator is not None else scores.device
    u = torch.rand(tuple(scores.shape), generator=generator, device=device, dtype=torch.float64).to(scores.device)
    gumbel = -torch.log(-torch.log(u.clamp(1e-300, 1.0 - 1e-16)))
    keys = torch.where(valid, w.double().log() + gumbel, float("-inf"))
    n = valid.sum(-1)
    k = selection_budget(n, fraction)
    mask = _take_ranks(_order(keys, valid), torch.zeros_like(k), k)
    # importance weights: 1 / pi, pi ~= min(1, k w / sum w), normalised to mean 1 over the selected
    pi = (k.unsqueeze(-1).double() * w.double() / w.double().sum(-1, keepdim=True).clamp_min(1e-300)).clamp(max=1.0)
    inv = torch.where(mask, 1.0 / pi.clamp_min(1e-300), 0.0)
    mean_inv = inv.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp_min(1)
    weights = torch.where(mask, inv / mean_inv.clamp_min(1e-300), 0.0).float()
    return mask, weights


class GlobalQueue:
    """GLS state: a FIFO queue of the most recent valid scores (1-D float32 on the scores' device)."""

    def __init__(self, capacity: int = DEFAULT_GLOBAL_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"global queue capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.scores = torch.empty(0, dtype=torch.float32)

    def __len__(self) -> int:
        return int(self.scores.numel())

    def push(self, scores: torch.Tensor) -> None:
        """Append scores [n] (oldest dropped beyond ``capacity``)."""
        new = scores.detach().reshape(-1).float()
        old = self.scores.to(new.device)
        self.scores = torch.cat([old, new])[-self.capacity :]

    def threshold(self, fraction: float) -> float | torch.Tensor:
        """The ``ceil(fraction * len)``-th largest queued score (``-inf`` when empty)."""
        n = len(self)
        if n == 0:
            return float("-inf")
        k = int(selection_budget(torch.tensor([n]), fraction).item())
        return torch.kthvalue(self.scores, n - k + 1).values

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "scores": self.scores.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.capacity = int(state["capacity"])
        self.scores = state["scores"].float().reshape(-1)[-self.capacity :].clone()


def _policy_global(
    scores: torch.Tensor, valid: torch.Tensor, fraction: float, *, state: Any = None, **_: Any
) -> PolicyResult:
    if not isinstance(state, GlobalQueue):
        raise ValueError("the global policy needs state=GlobalQueue(...) (see make_policy_state)")
    finite = valid & torch.isfinite(scores)
    state.push(scores[finite])
    thr = state.threshold(fraction)
    return finite & (scores >= thr), None


Policy = Callable[..., PolicyResult]

POLICIES: dict[str, Policy] = {
    "sequence": _policy_sequence,
    "batch": _policy_batch,
    "global": _policy_global,
    "stochastic": _policy_stochastic,
    "curriculum": _policy_curriculum,
    "none": _policy_none,
}


def get_policy(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown selection policy {name!r}; valid policies: {', '.join(POLICIES)}") from None


def make_policy_state(policy: str, capacity: int = DEFAULT_GLOBAL_CAPACITY) -> GlobalQueue | None:
    """The state object a policy keeps across steps (a :class:`GlobalQueue` for ``global``), or None."""
    get_policy(policy)
    return GlobalQueue(capacity) if policy == "global" else None


@overload
def select_positions(
    scores: torch.Tensor,
    valid: torch.Tensor,
    fraction: float,
    policy: str | Policy = ...,
    *,
    state: Any = ...,
    progress: float = ...,
    generator: torch.Generator | None = ...,
    return_weights: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def select_positions(
    scores: torch.Tensor,
    valid: torch.Tensor,
    fraction: float,
    policy: str | Policy = ...,
    *,
    state: Any = ...,
    progress: float = ...,
    generator: torch.Generator | None = ...,
    return_weights: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...


def select_positions(
    scores: torch.Tensor,
    valid: torch.Tensor,
    fraction: float,
    policy: str | Policy = "sequence",
    *,
    state: Any = None,
    progress: float = 0.0,
    generator: torch.Generator | None = None,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The position mask of one batch.

    scores: [B, L] float (higher = more important; ignored by ``none``); valid: [B, L] bool;
    fraction in (0, 1]; policy: a name in :data:`POLICIES` or the policy itself; state: the policy's state
    (:func:`make_policy_state`); progress in [0, 1] (curriculum); generator (stochastic).
    Returns mask [B, L] bool (a subset of ``valid``), and with ``return_weights=True`` also weights
    [B, L] float32 (importance weights for ``stochastic``; 1.0 at selected positions otherwise;
    0 elsewhere).
    """
    fn = get_policy(policy) if isinstance(policy, str) else policy
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool mask, got {valid.dtype}")
    if scores.shape != valid.shape or valid.dim() != 2:
        raise ValueError(f"scores and valid must both be [B, L], got {tuple(scores.shape)} and {tuple(valid.shape)}")
    if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    scores = torch.nan_to_num(scores.float(), nan=float("-inf"))
    mask, weights = fn(scores, valid, fraction, state=state, progress=progress, generator=generator)
    mask = mask & valid
    if not return_weights:
        return mask
    if weights is None:
        weights = mask.float()
    return mask, torch.where(mask, weights, 0.0)

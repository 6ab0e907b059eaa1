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

Policies (``fraction`` = f, ``n`` = number of valid positions of a sequence), registered as
:class:`Policy` objects, which also say how the KD term is averaged (:meth:`Policy.mean`):

* ``sequence`` (the paper's top-k, the default): per sequence, the top ``ceil(f * n)`` valid positions;
  ties go to the earlier position (deterministic). The KD term is the paper's two-level mean (per
  sequence, then over sequences), as for every policy but ``global``.
* ``batch``: the top ``ceil(f * N)`` over all ``N`` valid positions of the batch.
* ``global`` (GLS): a FIFO queue of the most recent valid scores (:class:`GlobalQueue`, default
  30,000). The threshold is the empirical ``1 - f`` quantile of the queue *before* this batch's scores
  join it (the reference code's order); every valid position with ``score >= threshold`` is selected,
  then the batch's scores are queued. The first batch (empty queue) selects per sequence. The KD term
  is the mean over all selected positions of the batch (the paper normalises every policy but GLS per
  sequence), so a sequence with many high scores weighs more. Its state is per process (under DDP each
  rank keeps its own queue) and checkpointable.
* ``stochastic`` (the paper's Pos RS-KD): per sequence, ``K = ceil(f * n)`` positions drawn *with
  replacement* with probability ``q_t`` proportional to the score (shifted so the smallest valid one is
  0 when any is negative, floored at a tiny positive weight); a position drawn ``c_t`` times counts
  ``c_t`` times (its logits are computed once). With importance weights (the default, Pos RS-KD*) the
  estimate is Hansen-Hurwitz's ``(1 / K) sum c_t l_t / (n q_t)``, exactly unbiased for the full-KD mean
  at any budget; without (``--no-importance-weights``) it is ``(1 / K) sum c_t l_t``, unbiased for the
  score-weighted mean ``sum q_t l_t`` (the paper's uncorrected variant). Fewer than K distinct
  positions may be selected when a position is drawn twice.
* ``curriculum``: per sequence, a window of ``k = ceil(f * n)`` consecutive ranks slides from the
  lowest-scoring positions (step 0: the easiest, where the student is most certain) to the top ``k``
  (identical to ``sequence``), reached after ``--curriculum-steps`` optimizer steps (the paper: 4000)
  and kept from then on. The window starts at ascending rank ``floor(phase * (n - k))`` with
  ``phase = min(1, step / curriculum_steps)``, linear as in the reference code (whose schedule power
  and start/end fractions we do not expose; the paper used the defaults, 1, 0 and 1).
* ``none``: every valid position (full KD).

Hybrid, ``--select SIGNAL:FRACTION+random:SHARE`` (e.g. ``student-entropy:0.15+random:0.05``): after
the policy (any but ``stochastic``, which samples already), ``ceil(SHARE * n)`` more positions per
sequence drawn uniformly without replacement from the valid positions it left. The paper does not
define it; the KD term averages every selected position alike (no importance weights: like top-k, it
is a selection, not an estimate of full KD).

Invalid positions are never selected by any policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch

from selkd.trainer import losses as L
from selkd.trainer.spec import DEFAULT_CURRICULUM_STEPS, DEFAULT_GLOBAL_CAPACITY, SAMPLING_POLICIES

__all__ = [
    "DEFAULT_GLOBAL_CAPACITY",
    "POLICIES",
    "SIGNALS",
    "GlobalQueue",
    "Policy",
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


def _uniform(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """float64 uniforms in [0, 1) of ``shape`` on ``device``, drawn on the generator's device."""
    where = generator.device if generator is not None else device
    return torch.rand(tuple(shape), generator=generator, device=where, dtype=torch.float64).to(device)


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
    scores: torch.Tensor,
    valid: torch.Tensor,
    fraction: float,
    *,
    step: int = 0,
    curriculum_steps: int = DEFAULT_CURRICULUM_STEPS,
    **_: Any,
) -> PolicyResult:
    """The window of ``k = ceil(f * n)`` consecutive ranks starts at ascending rank
    ``floor(phase * (n - k))``, ``phase = min(1, step / curriculum_steps)`` (the reference code's rule)."""
    if curriculum_steps < 1 or step < 0:
        raise ValueError(f"curriculum needs step >= 0 and curriculum_steps >= 1, got {step} and {curriculum_steps}")
    phase = min(1.0, step / curriculum_steps)
    n = valid.sum(-1)
    k = selection_budget(n, fraction)
    from_bottom = torch.floor(phase * (n - k).double() + 1e-8).long()
    return _take_ranks(_order(scores, valid), (n - k) - from_bottom, k), None


def _sampling_weights(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, L] float64 sampling weights: the scores shifted so that the smallest valid one is 0 when any is
    negative, floored at a tiny positive weight (every valid position can be drawn); 0 where invalid."""
    s = torch.where(valid & torch.isfinite(scores), scores.double(), 0.0)
    lowest = torch.where(valid, s, float("inf")).amin(-1, keepdim=True)
    shift = torch.where(lowest < 0, lowest, 0.0)
    return torch.where(valid, (s - shift).clamp_min(_MIN_WEIGHT), 0.0)


def _policy_stochastic(
    scores: torch.Tensor,
    valid: torch.Tensor,
    fraction: float,
    *,
    generator: torch.Generator | None = None,
    importance_weights: bool = True,
    **_: Any,
) -> PolicyResult:
    """``K = ceil(f * n)`` draws with replacement from ``q_t = w_t / sum w`` per sequence (the paper's
    Pos RS-KD); the mask holds the positions drawn at least once (``c_t`` times). The weights make
    :func:`~selkd.trainer.losses.sequence_mean`, which divides by the number of selected positions, equal
    to ``(1 / K) sum_t c_t l_t / (n q_t)`` (Hansen-Hurwitz: exactly unbiased for the full-KD mean of the
    sequence at any budget) or, without importance weights, ``(1 / K) sum_t c_t l_t`` (unbiased for the
    score-weighted mean ``sum_t q_t l_t``)."""
    w = _sampling_weights(scores, valid)
    n = valid.sum(-1, keepdim=True)
    k = selection_budget(n, fraction)  # [B, 1] draws per sequence
    q = w / w.sum(-1, keepdim=True).clamp_min(1e-300)
    rows = torch.where(n > 0, q, 1.0)  # a sequence without valid positions draws nothing below
    most = max(1, math.ceil(fraction * valid.shape[-1] - 1e-6))  # >= every k, known without a host sync
    device = generator.device if generator is not None else scores.device
    draws = torch.multinomial(rows.to(device), most, replacement=True, generator=generator).to(scores.device)
    used = torch.arange(most, device=scores.device).unsqueeze(0) < k
    counts = torch.zeros_like(w).scatter_add_(-1, draws, used.double())  # c_t
    mask = counts > 0
    per_draw = counts / k.clamp_min(1)
    if importance_weights:
        per_draw = per_draw / (n * q).clamp_min(1e-300)
    return mask, (per_draw * mask.sum(-1, keepdim=True)).float()


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

    def threshold(self, fraction: float) -> torch.Tensor:
        """The empirical ``1 - fraction`` quantile of the queued scores, linearly interpolated between order
        statistics as ``torch.quantile`` does (the reference code's threshold); needs a non-empty queue.
        Computed with two ``kthvalue`` calls, as ``torch.quantile`` refuses more than 2**24 scores."""
        n = len(self)
        if n == 0:
            raise ValueError("the global queue is empty: there is no threshold yet")
        pos = (1.0 - fraction) * (n - 1)
        lo = math.floor(pos)
        low = torch.kthvalue(self.scores, lo + 1).values
        high = torch.kthvalue(self.scores, min(lo + 2, n)).values
        return low + (high - low) * (pos - lo)

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "scores": self.scores.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.capacity = int(state["capacity"])
        self.scores = state["scores"].float().reshape(-1)[-self.capacity :].clone()


def _policy_global(
    scores: torch.Tensor, valid: torch.Tensor, fraction: float, *, state: Any = None, **_: Any
) -> PolicyResult:
    """GLS: the threshold comes from the scores of earlier batches only; this batch's scores are queued
    after selecting. The first batch (empty queue) selects per sequence, as the reference code does."""
    if not isinstance(state, GlobalQueue):
        raise ValueError("the global policy needs state=GlobalQueue(...) (see make_policy_state)")
    finite = valid & torch.isfinite(scores)
    if len(state) == 0:
        mask = _policy_sequence(scores, finite, fraction)[0]
    else:
        mask = finite & (scores >= state.threshold(fraction))
    state.push(scores[finite])
    return mask, None


def _add_random_share(
    mask: torch.Tensor, valid: torch.Tensor, share: float, generator: torch.Generator | None
) -> torch.Tensor:
    """The hybrid's random share: per sequence, ``ceil(share * n)`` more positions (at most as many as are
    left), drawn uniformly without replacement from the valid positions ``mask`` did not select."""
    rest = valid & ~mask
    k = torch.minimum(selection_budget(valid.sum(-1), share), rest.sum(-1))
    keys = _uniform(valid.shape, generator, valid.device)
    return mask | _take_ranks(_order(keys, rest), torch.zeros_like(k), k)


@dataclass(frozen=True)
class Policy:
    """A registered selection policy: ``fn(scores, valid, fraction, **kw) -> (mask, weights or None)``, and
    how the KD term is averaged over what it selects (:meth:`mean`)."""

    name: str
    fn: Callable[..., PolicyResult]
    flat_mean: bool = False  # average over the batch's selected positions (GLS), not per sequence first
    make_state: Callable[[int], Any] | None = None  # state kept across steps, made from --global-queue

    @property
    def samples(self) -> bool:
        """Whether the policy draws positions at random itself (no random share on top)."""
        return self.name in SAMPLING_POLICIES

    def mean(self, values: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """The KD term from per-position values [B, L]: the paper's per-sequence mean, or for GLS the mean
        over all selected positions of the batch (the reference code's; the paper normalises every policy
        but GLS per sequence). Returns a scalar float32."""
        if self.flat_mean:
            return L.masked_mean(values, mask, weights)
        return L.sequence_mean(values, mask, weights)


POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy("sequence", _policy_sequence),
        Policy("batch", _policy_batch),
        Policy("global", _policy_global, flat_mean=True, make_state=GlobalQueue),
        Policy("stochastic", _policy_stochastic),
        Policy("curriculum", _policy_curriculum),
        Policy("none", _policy_none),
    )
}


def get_policy(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown selection policy {name!r}; valid policies: {', '.join(POLICIES)}") from None


def make_policy_state(policy: str, capacity: int = DEFAULT_GLOBAL_CAPACITY) -> GlobalQueue | None:
    """The state object a policy keeps across steps (a :class:`GlobalQueue` for ``global``), or None."""
    make = get_policy(policy).make_state
    return None if make is None else make(capacity)


@overload
def select_positions(
    scores: torch.Tensor,
    valid: torch.Tensor,
    fraction: float,
    policy: str | Policy = ...,
    *,
    return_weights: Literal[False] = ...,
    **kw: Any,
) -> torch.Tensor: ...


@overload
def select_positions(
    scores: torch.Tensor,
    valid: torch.Tensor,
    fraction: float,
    policy: str | Policy = ...,
    *,
    return_weights: Literal[True],
    **kw: Any,
) -> tuple[torch.Tensor, torch.Tensor]: ...


def select_positions(
    scores: torch.Tensor,
    valid: torch.Tensor,
    fraction: float,
    policy: str | Policy = "sequence",
    *,
    state: Any = None,
    step: int = 0,
    curriculum_steps: int = DEFAULT_CURRICULUM_STEPS,
    generator: torch.Generator | None = None,
    importance_weights: bool = True,
    random_share: float = 0.0,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The position mask of one batch.

    scores: [B, L] float (higher = more important; ignored by ``none``); valid: [B, L] bool;
    fraction in (0, 1]; policy: a name in :data:`POLICIES` or the :class:`Policy` itself; state: the
    policy's state (:func:`make_policy_state`); step (optimizer steps done) and curriculum_steps
    (curriculum); generator (stochastic draws, the random share); importance_weights (stochastic);
    random_share: the hybrid's uniform share of the positions the policy left (not with ``stochastic``).
    Returns mask [B, L] bool (a subset of ``valid``), and with ``return_weights=True`` also weights
    [B, L] float32 (for ``stochastic`` the ones :func:`_policy_stochastic` describes; 1.0 at selected
    positions otherwise; 0 elsewhere).
    """
    pol = get_policy(policy) if isinstance(policy, str) else policy
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool mask, got {valid.dtype}")
    if scores.shape != valid.shape or valid.dim() != 2:
        raise ValueError(f"scores and valid must both be [B, L], got {tuple(scores.shape)} and {tuple(valid.shape)}")
    if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if random_share and pol.samples:
        raise ValueError(f"the {pol.name} policy draws its positions at random already: it takes no random share")
    scores = torch.nan_to_num(scores.float(), nan=float("-inf"))
    mask, weights = pol.fn(
        scores,
        valid,
        fraction,
        state=state,
        step=step,
        curriculum_steps=curriculum_steps,
        generator=generator,
        importance_weights=importance_weights,
    )
    mask = mask & valid
    if random_share > 0:
        mask = _add_random_share(mask, valid, random_share, generator)
    if not return_weights:
        return mask
    if weights is None:
        weights = mask.float()
    return mask, torch.where(mask, weights, 0.0)

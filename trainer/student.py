"""One distillation step's forward: decoder once, no-grad scores, LM head with grad where selected.

:class:`SelectiveStudent` wraps the Hugging Face model so that the whole step runs inside one
``forward``. That matters for the wrappers: DDP prepares gradient sync in ``forward`` and FSDP2
unshards the root's parameters (the LM head among them) only around it, so the selective head
must run inside, not after, the wrapped call.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from selkd.cache.doc_attention import attention_inputs
from selkd.cache.modes import MODES
from selkd.cache.targets import SparseTargets
from selkd.trainer import head as H
from selkd.trainer import losses as L
from selkd.trainer import selection as S
from selkd.trainer.spec import DEFAULT_CURRICULUM_STEPS, FULL_KD


@dataclass(frozen=True)
class Objective:
    """What a step optimises: signal and policy choose positions, ``loss`` compares there.

    The fields name them (as the options do); the objects they name are looked up once, when the
    objective is made, not in every step: ``scorer`` (the :class:`~selkd.trainer.selection.Signal`, None
    for full KD), ``selector`` (the :class:`~selkd.trainer.selection.Policy`) and ``loss_fn`` (the
    divergence). The step's loss is ``kd_weight * kd_scale * KD + ce_weight * CE`` (:attr:`kd_scale`)."""

    signal: str  # a name in selection.SIGNALS, or "none" (full KD)
    fraction: float
    policy: str  # a name in selection.POLICIES ("none" for full KD)
    loss: str  # a name in losses.LOSSES
    temperature: float = 1.0
    topk_renormalize: bool = False
    kd_weight: float = 1.0  # 0: no position is distilled (the CE-only baseline)
    ce_weight: float = 0.0
    ce_on: str = "all"  # "all" valid positions or the "selected" ones
    chunk: int = 128
    importance_weights: bool = True  # stochastic policy: Hansen-Hurwitz weights (unbiased for full KD)
    curriculum_steps: int = DEFAULT_CURRICULUM_STEPS  # curriculum policy: steps until plain top-k
    random_share: float = 0.0  # hybrid: a uniform share of the positions the policy left

    @property
    def kd_scale(self) -> float:
        """``T**2``: the KD term's factor at temperature ``T``. Dividing the logits by ``T`` scales the
        divergence's gradient by ``1 / T**2`` (Hinton et al. 2015); the factor restores it, so that the
        KD term's gradient stays comparable with the CE term's and with ``T = 1`` (the reference code
        multiplies by ``T**2`` too). 1 at ``T = 1``, the paper's setting."""
        return self.temperature**2

    def __post_init__(self) -> None:
        # Plain attributes, not fields: dataclasses.replace (which torch's wrappers may apply to forward's
        # arguments) then makes the objective again from its names and resolves them again.
        resolved = {
            "scorer": None if self.signal == FULL_KD else S.get_signal(self.signal),
            "selector": S.get_policy(self.policy),
            "loss_fn": L.get_loss(self.loss),
        }
        for name, value in resolved.items():
            object.__setattr__(self, name, value)  # frozen: set once, here


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, what backward runs on
    kd: torch.Tensor  # scalar (detached): the policy's mean of the divergence, before kd_weight and kd_scale
    ce: torch.Tensor  # scalar (detached), 0 when ce_weight == 0
    per_position: torch.Tensor  # [B, L] float32 KD value at selected positions (detached), 0 elsewhere
    selected: torch.Tensor  # [B, L] bool
    n_selected: torch.Tensor  # scalar int64 on the device: positions distilled (read by the loop at log steps only)
    n_valid: torch.Tensor  # scalar int64 on the device: positions with a target


@dataclass
class EvalSums:
    """Sums over the valid positions of held-out batches (divide by ``n``), one per name: ``eval_ce``
    (the student's -log q of the true next token), ``eval_top1_agree`` (student argmax == teacher
    argmax), then the divergences :func:`eval_divergences` names."""

    names: tuple[str, ...]
    sums: torch.Tensor  # [len(names)] float64, on the student's device
    n: int


_STEMS = {"fkl": "kl", "rkl": "rkl", "jsd": "jsd"}  # loss name -> its metric's name after "eval_"


def eval_divergences(objective: Objective, mode: str) -> dict[str, str]:
    """{metric name: what it is} of the divergences :func:`evaluate` reports on targets of ``mode``.

    First, forward KL(teacher || student) at the targets' temperature, under a name that says how it is
    known: ``eval_kl`` exact on full targets; on top-k targets ``eval_kl_bound``, over the k classes and
    the tail bucket, a lower bound of the full KL (merging classes never raises a divergence); on sampled
    targets ``eval_kl``, the unbiased estimate CE(sampled targets, q) - H(p), with the teacher's entropy
    H(p) that the cache stores (computed from the full distribution, stored as float16; its rounding
    error is far below the sampling error). That entropy is the one at temperature 1, so at another
    temperature the metric is the cross-entropy alone, ``eval_kl_plus_teacher_entropy``.
    Second, when the objective's divergence (``--loss``, ``--topk-renormalize``) is another number, that
    one under its own name: ``eval_rkl``, ``eval_jsd`` (with ``_bound`` on top-k targets), or with
    ``_topk_renormalized`` against the renormalised top-k target.
    """
    at = f" at temperature {objective.temperature:g}" if objective.temperature != 1.0 else ""
    kl = MODES[mode].kl  # how the forward KL on these targets is known: exact, a bound or an estimate
    if kl == "bound":
        names = {"eval_kl_bound": f"forward KL{at} over the k stored classes and the tail, a lower bound of the KL"}
    elif kl == "exact":
        names = {"eval_kl": f"forward KL{at}, exact"}
    elif objective.temperature == 1.0:
        names = {"eval_kl": "forward KL, estimated from the sampled targets and the stored teacher entropy"}
    else:
        names = {
            "eval_kl_plus_teacher_entropy": f"cross-entropy of the sampled targets{at}: forward KL plus the "
            "teacher's entropy at that temperature, which the cache does not store"
        }
    if objective.loss != "fkl" or objective.topk_renormalize:
        suffix = "_topk_renormalized" if objective.topk_renormalize else "_bound" if kl == "bound" else ""
        what = "against the renormalised top-k target" if suffix == "_topk_renormalized" else "on the stored targets"
        names[f"eval_{_STEMS[objective.loss]}{suffix}"] = f"the training divergence (--loss {objective.loss}) {what}"
    return names


def _forward_kl(
    logits: torch.Tensor, targets: SparseTargets, entropy: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Forward KL per position as :func:`eval_divergences` names it. logits: [N, V]; targets: leading
    [N]; entropy: [N] the teacher's at temperature 1. Returns [N] float32."""
    if MODES[targets.mode].kl != "estimate":
        return L.fkl(logits, targets, temperature=temperature)
    assert targets.ids is not None
    logq = torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, targets.ids)
    p = targets.probs()  # count / N, 0 at padding slots
    ce = -(p * torch.where(p > 0, logq, 0.0)).sum(-1)
    return ce - entropy if temperature == 1.0 else ce


def teacher_top1(targets: SparseTargets) -> torch.Tensor:
    """[...] the teacher's most likely class per position (for sample targets: the most drawn id)."""
    best = targets.logprobs.argmax(-1, keepdim=True)
    return best.squeeze(-1) if targets.ids is None else targets.ids.gather(-1, best).squeeze(-1)


class SelectiveStudent(nn.Module):
    def __init__(self, model: nn.Module, doc_attention: bool = True) -> None:
        super().__init__()
        self.model = model
        self.transform = H.logits_transform(model)
        self.doc_attention = doc_attention  # each packed document attends only to itself

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        valid: torch.Tensor,
        targets: SparseTargets,
        teacher_entropy: torch.Tensor,
        teacher_logprob: torch.Tensor,
        objective: Objective,
        policy_state: Any = None,
        step: int = 0,
        generator: torch.Generator | None = None,
        evaluate: bool = False,
        doc_start: torch.Tensor | None = None,
    ) -> StepOutput | EvalSums:
        """Shapes: input_ids, attention_mask, labels, valid, teacher_*, doc_start [B, L]; targets leading
        [B, L]. ``step``: optimizer steps done (the curriculum's clock). ``evaluate=True`` returns held-out
        statistics instead (call it under no_grad). With ``doc_attention`` and ``doc_start`` given, each
        packed document attends only to itself."""
        obj = objective
        attention = attention_inputs(doc_start, attention_mask, self.doc_attention)
        hidden = H.hidden_states(self.model, input_ids, **attention)  # [B, L, H], with grad
        head = H.lm_head(self.model)
        if evaluate:
            return self._evaluate(head, hidden, labels, valid, targets, teacher_entropy, obj)
        signal_inputs = S.SignalInputs(
            valid=valid, teacher_entropy=teacher_entropy, teacher_logprob=teacher_logprob, generator=generator
        )
        mask, weights = self._select(head, hidden, labels, targets, signal_inputs, obj, policy_state, step)

        # --- the LM head with grad only at the selected positions --------------------------------
        logits = H.selected_logits(head, hidden, mask, self.transform)  # [N_sel, V]
        loss_kw = {"temperature": obj.temperature, "topk_renormalize": obj.topk_renormalize}
        kd_sel = L.chunked(obj.loss_fn, obj.chunk, checkpoint=True)(logits, targets.select(mask), **loss_kw)
        per_position = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
        per_position = per_position.masked_scatter(mask, kd_sel.float())
        kd = obj.selector.mean(per_position, mask, weights)

        ce = torch.zeros((), device=hidden.device)  # 0 unless the CE term is on
        if obj.ce_weight > 0:
            ce = self._ce(head, hidden, logits, labels, valid, mask, obj)
        loss = obj.kd_weight * obj.kd_scale * kd + obj.ce_weight * ce  # ce is 0 when its weight is
        return StepOutput(loss, kd.detach(), ce.detach(), per_position.detach(), mask, mask.sum(), valid.sum())

    def _select(
        self,
        head: nn.Module,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        targets: SparseTargets,
        inputs: S.SignalInputs,
        obj: Objective,
        policy_state: Any,
        step: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Which positions are distilled: (mask [B, L] bool, weights [B, L] float32). The signal's scores
        come from no-grad, chunked statistics; only the ones it needs are computed."""
        valid = inputs.valid
        if obj.kd_weight == 0:
            mask = torch.zeros_like(valid)  # nothing distilled: no head, no targets, no scores
            return mask, mask.float()
        sig = obj.scorer
        if sig is None:  # full KD
            return valid, valid.float()
        loss_kw = {"temperature": obj.temperature, "topk_renormalize": obj.topk_renormalize}
        if sig.needs_student_pass:
            stats = H.chunked_token_stats(head, hidden, labels, obj.chunk, self.transform)
            inputs.student_entropy, inputs.student_ce = stats.entropy, stats.ce
        if sig.needs_kl:
            inputs.kl = lambda: H.chunked_divergence(
                head, hidden, targets, L.fkl, valid, obj.chunk, self.transform, **loss_kw
            )
        if sig.needs_reverse_kl:
            inputs.reverse_kl = lambda: H.chunked_divergence(
                head, hidden, targets, L.rkl, valid, obj.chunk, self.transform, **loss_kw
            )
        return S.select_positions(
            sig.scores(inputs),
            valid,
            obj.fraction,
            obj.selector,
            state=policy_state,
            step=step,
            curriculum_steps=obj.curriculum_steps,
            generator=inputs.generator,
            importance_weights=obj.importance_weights,
            random_share=obj.random_share,
            return_weights=True,
        )

    def _ce(
        self,
        head: nn.Module,
        hidden: torch.Tensor,
        logits: torch.Tensor,
        labels: torch.Tensor,
        valid: torch.Tensor,
        mask: torch.Tensor,
        obj: Objective,
    ) -> torch.Tensor:
        """The next-token CE term (scalar): on the selected positions (their ``logits`` [N_sel, V] exist
        already) or on every valid one (head + CE a chunk at a time, recomputed in backward, so the
        [N_valid, V] logits never exist at once)."""
        if obj.ce_on == "selected":
            return L.masked_mean(L.chunked(L.ce_per_position, obj.chunk, checkpoint=True)(logits, labels[mask]))

        def head_ce(h: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
            z = head(h)
            return L.ce_per_position(z if self.transform is None else self.transform(z), lab)

        return L.masked_mean(L.chunked(head_ce, obj.chunk, checkpoint=True)(hidden[valid], labels[valid]))

    def _evaluate(
        self,
        head: nn.Module,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        valid: torch.Tensor,
        targets: SparseTargets,
        teacher_entropy: torch.Tensor,
        obj: Objective,
    ) -> EvalSums:
        """Shapes as in ``forward``; the statistics of every valid position, ``obj.chunk`` at a time."""
        flat = hidden[valid]
        sel_targets = targets.select(valid)
        lab = labels[valid]
        entropy = teacher_entropy[valid].float()
        top1 = teacher_top1(sel_targets)
        divergences = eval_divergences(obj, targets.mode)
        loss_kw = {"temperature": obj.temperature, "topk_renormalize": obj.topk_renormalize}

        def stats(logits: torch.Tensor, rows: slice) -> torch.Tensor:
            part = sel_targets.select(rows)
            columns = [
                L.ce_per_position(logits, lab[rows]),
                (logits.argmax(-1) == top1[rows]).float(),
                _forward_kl(logits, part, entropy[rows], obj.temperature),
            ]
            if len(divergences) > 1:  # the training divergence is another number
                columns.append(obj.loss_fn(logits, part, **loss_kw).float())
            return torch.stack(columns, -1)

        out = H.chunked_map(head, flat, stats, obj.chunk, self.transform)  # [N, 2 + len(divergences)]
        names = ("eval_ce", "eval_top1_agree", *divergences)
        return EvalSums(names, out.sum(0, dtype=torch.float64), int(flat.shape[0]))


def evaluate(
    student: nn.Module,
    batches: Iterable[Any],
    objective: Objective,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Held-out statistics over ``batches`` (trainer ``Batch`` objects), averaged over every valid
    position: the student's CE and perplexity on the true next tokens, its top-1 agreement with the
    teacher, and its divergences to the teacher as :func:`eval_divergences` names them. ``student`` is a
    :class:`SelectiveStudent` (or its FSDP-wrapped self); its train/eval mode is restored. The sums stay
    on the device until the end (one host sync per evaluation)."""
    was_training = student.training
    student.eval()
    total: EvalSums | None = None
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            b = batch.to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                s = student(*b.student_inputs(), objective, evaluate=True, doc_start=b.doc_start)
            total = s if total is None else EvalSums(s.names, total.sums + s.sums, total.n + s.n)
    student.train(was_training)
    if total is None:
        return {}
    means = dict(zip(total.names, (total.sums / max(total.n, 1)).tolist()))
    ppl = math.exp(min(means["eval_ce"], 50))
    return {"eval_ce": means.pop("eval_ce"), "eval_ppl": ppl, **means, "eval_positions": total.n}

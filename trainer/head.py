"""The selective LM head: SE-KD's memory trick.

A training step runs the student's decoder once (:func:`hidden_states`), scores positions from
no-grad statistics computed ``chunk`` positions at a time (:func:`chunked_entropy`,
:func:`chunked_token_stats`, :func:`chunked_divergence`), and applies the LM head *with grad* only to
the selected hidden states (:func:`selected_logits`). The ``[B, L, V]`` logits are never built: the
largest logits tensor is ``[max(chunk, N_sel), V]``.

Post-head transforms: a few architectures change logits after the head;
:func:`selkd.cache.logits.logits_transform` returns the transform to apply on the selective path so
that it equals ``model(...).logits`` (the builder's sample scorer applies the same one), and the
entropy is :func:`selkd.cache.logits.softmax_entropy`'s, as everywhere in selkd.
:func:`check_selective_head` compares both paths on a short real text; the trainer runs it at start-up
(:func:`selkd.trainer.setup.wrap_student`), so an architecture with a post-head transform nobody listed
is refused instead of trained on other logits.

Padded heads: the student's entropy (and CE) is of its distribution over its whole head, padded rows
(ids >= the tokenizer's length) included. That is the distribution it samples from; the KD loss pushes the
padded mass to 0 (the normaliser of ``log q`` covers every row, :mod:`selkd.trainer.losses`), so it stops
counting as uncertainty once trained, and ``-inf`` logits there are safe (``softmax_entropy``). The
builder's sample scorer reads the same number.

Distributed wrappers: call these on the unwrapped ``PreTrainedModel``. Under DDP, calling the inner
decoder bypasses DDP's ``forward`` (and its gradient-sync preparation), so the caller must either run
the decoder through a wrapper module or use FSDP2 / ``no_sync`` handling of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from selkd.cache.logits import Transform, apply_head, hidden_states, lm_head, logits_transform, softmax_entropy
from selkd.cache.targets import SparseTargets

__all__ = [
    "TokenStats",
    "check_selective_head",
    "chunked_divergence",
    "chunked_entropy",
    "chunked_map",
    "chunked_token_stats",
    "hidden_states",
    "lm_head",
    "logits_transform",
    "selected_logits",
]


@torch.no_grad()
def chunked_map(
    head: nn.Module,
    hidden_flat: torch.Tensor,
    fn: Callable[[torch.Tensor, slice], torch.Tensor],
    chunk: int = 128,
    transform: Transform | None = None,
) -> torch.Tensor:
    """Apply ``fn(logits [c, V], rows: slice) -> [c, ...]`` to the logits of ``chunk`` positions at a
    time, under no_grad, and concatenate. ``rows`` indexes any side input aligned with
    ``hidden_flat`` [N, H]. Returns [N, ...]. Logits are in the head's dtype; ``fn`` upcasts."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if hidden_flat.dim() != 2:
        raise ValueError(f"hidden_flat must be [N, H], got {tuple(hidden_flat.shape)}")
    n = hidden_flat.shape[0]
    parts = []
    for s in range(0, max(n, 1), chunk):
        rows = slice(s, min(s + chunk, n))
        parts.append(fn(apply_head(head, hidden_flat[rows], transform), rows))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def chunked_entropy(
    head: nn.Module, hidden: torch.Tensor, chunk: int = 128, transform: Transform | None = None
) -> torch.Tensor:
    """Entropy (nats, temperature 1) of ``softmax(head(hidden))`` per position, ``chunk`` positions at
    a time under no_grad. hidden: [B, L, H] -> [B, L] float32."""
    b, length, h = hidden.shape
    flat = hidden.detach().reshape(b * length, h)
    entropy = chunked_map(head, flat, lambda logits, rows: softmax_entropy(logits).entropy, chunk, transform)
    return entropy.reshape(b, length)


class TokenStats(NamedTuple):
    entropy: torch.Tensor  # [B, L] float32, student entropy at temperature 1
    ce: torch.Tensor  # [B, L] float32, -log q(label); 0 where the label is ignore_index


def chunked_token_stats(
    head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    chunk: int = 128,
    transform: Transform | None = None,
    ignore_index: int = -100,
) -> TokenStats:
    """Student entropy and student CE in one chunked no-grad pass.

    hidden: [B, L, H]; labels: [B, L] int64 next-token ids aligned with ``hidden`` (label[t] is the
    token after position t), ``ignore_index`` where there is none. Returns :class:`TokenStats`.
    """
    b, length, h = hidden.shape
    if labels.shape != (b, length):
        raise ValueError(f"labels must be [B, L] = {(b, length)}, got {tuple(labels.shape)}")
    flat_labels = labels.reshape(-1)

    def stats(logits: torch.Tensor, rows: slice) -> torch.Tensor:
        _, lse, ent = softmax_entropy(logits)
        lab = flat_labels[rows]
        keep = lab != ignore_index
        ce = lse - logits.gather(-1, torch.where(keep, lab, 0).unsqueeze(-1)).squeeze(-1).float()  # -log q(label)
        return torch.stack([ent, torch.where(keep, ce, 0.0)], dim=-1)

    out = chunked_map(head, hidden.detach().reshape(b * length, h), stats, chunk, transform)
    return TokenStats(out[:, 0].reshape(b, length), out[:, 1].reshape(b, length))


def chunked_divergence(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: SparseTargets,
    loss_fn: Callable[..., torch.Tensor],
    valid: torch.Tensor | None = None,
    chunk: int = 128,
    transform: Transform | None = None,
    **loss_kwargs: Any,
) -> torch.Tensor:
    """A per-position divergence (e.g. ``losses.fkl``) between teacher targets and the student, for
    selection signals: chunked, no_grad. hidden: [B, L, H]; targets: leading shape [B, L]; valid:
    [B, L] bool or None (all). Returns [B, L] float32, 0 at invalid positions."""
    b, length, _ = hidden.shape
    if tuple(targets.shape) != (b, length):
        raise ValueError(f"targets must have leading shape [B, L] = {(b, length)}, got {tuple(targets.shape)}")
    if valid is None:
        valid = torch.ones((b, length), dtype=torch.bool, device=hidden.device)
    sel_targets = targets.select(valid)
    h = hidden.detach()[valid]

    def div(logits: torch.Tensor, rows: slice) -> torch.Tensor:
        return loss_fn(logits, sel_targets.select(rows), **loss_kwargs).float()

    values = chunked_map(head, h, div, chunk, transform)
    out = torch.zeros((b, length), dtype=torch.float32, device=hidden.device)
    out[valid] = values
    return out


def selected_logits(
    head: nn.Module,
    hidden: torch.Tensor,
    index: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    transform: Transform | None = None,
) -> torch.Tensor:
    """The LM head *with grad* on the selected positions only.

    hidden: [B, L, H]; index: bool mask [B, L] or ``(b_idx, t_idx)``. Returns [N_sel, V] in the
    head's dtype, rows in the order of ``hidden[index]`` (row-major for a mask), so they line up
    with ``targets.select(index)``.
    """
    if isinstance(index, torch.Tensor) and (index.dtype != torch.bool or index.shape != hidden.shape[:2]):
        raise ValueError(f"index must be a bool mask [B, L] = {tuple(hidden.shape[:2])} or (b_idx, t_idx)")
    return apply_head(head, hidden[index], transform)


@torch.no_grad()
def check_selective_head(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    atol: float = 1e-3,
    rtol: float = 1e-3,
) -> float:
    """Compare ``lm_head(hidden_states(...))`` (+ transform) with ``model(...).logits`` on a batch
    (in eval mode; the training flag is restored). Returns the max abs difference; raises ValueError
    if they differ beyond ``atol + rtol * |logits|`` (an architecture whose post-head transform this
    module does not know)."""
    was_training = model.training
    model.eval()  # dropout would make the two passes differ
    try:
        ref = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        hidden = hidden_states(model, input_ids, attention_mask)
        ours = apply_head(lm_head(model), hidden, logits_transform(model))
    finally:
        model.train(was_training)
    ours, ref = ours.float(), ref.float()
    # NaN/inf where the model itself gives them (broken weights) is the loss check's to report, not a
    # transform mismatch: non-finite values must only agree
    diff = torch.nan_to_num((ours - ref).abs(), nan=0.0, posinf=0.0)
    worst = float(diff.max()) if diff.numel() else 0.0
    if not torch.isclose(ours, ref, rtol=rtol, atol=atol, equal_nan=True).all():
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(
            f"selective head differs from model(...).logits for model_type {model_type!r} (max abs diff "
            f"{worst:.3g}): it applies a post-head transform this trainer does not replicate"
        )
    return worst

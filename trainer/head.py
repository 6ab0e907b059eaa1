"""The selective LM head: SE-KD's memory trick.

A training step runs the student's decoder once (:func:`hidden_states`), scores positions from
no-grad statistics computed ``chunk`` positions at a time (:func:`chunked_entropy`,
:func:`chunked_token_stats`, :func:`chunked_divergence`), and applies the LM head *with grad* only to
the selected hidden states (:func:`selected_logits`). The ``[B, L, V]`` logits are never built: the
largest logits tensor is ``[max(chunk, N_sel), V]``.

Post-head transforms: a few architectures change logits after the head. :func:`logits_transform`
returns the transform to apply on the selective path so that it equals ``model(...).logits``
(Gemma-2 style final soft-capping, Granite's ``logits_scaling`` division, Cohere's ``logit_scale``
multiplication) and refuses the architectures known to do something else.
:func:`check_selective_head` compares both paths on a real batch (cheap insurance at start-up).

Distributed wrappers: call these on the unwrapped ``PreTrainedModel``. Under DDP, calling the inner
decoder bypasses DDP's ``forward`` (and its gradient-sync preparation), so the caller must either run
the decoder through a wrapper module or use FSDP2 / ``no_sync`` handling of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

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

Transform = Callable[[torch.Tensor], torch.Tensor]

# model_type -> how its CausalLM forward changes logits after the head, for the simple scalings.
_DIVIDE_BY_LOGITS_SCALING = {
    "granite",
    "granitemoe",
    "granitemoeshared",
    "granitemoehybrid",
    "granite_swa",
    "granitemoe_swa",
}
_MULTIPLY_BY_LOGIT_SCALE = {"cohere", "cohere2", "cohere2_moe"}
# Known post-head transforms this module does not replicate: refused on the selective path.
_UNSUPPORTED = {
    "recurrent_gemma": "soft-caps with config.logits_soft_cap inside its forward",
    "hyperclovax": "multiplies logits by config.logits_scaling",
    "muse_glimmer": "pre-scales logits by output_multiplier before soft-capping",
    "muse_spark": "pre-scales logits by output_multiplier before soft-capping",
    "inkling": "slices logits to unpadded_vocab_size",
    "inkling2": "applies a logit_softcap module",
    "inkling2_loop": "applies a logit_softcap module",
    "cohere_compass": "multiplies logits by an optional logit_scale",
    "xlstm": "post-processes logits in its forward",
}


def _decoder(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "model", None)
    if not isinstance(decoder, nn.Module) or decoder is model:
        raise ValueError(
            f"cannot find the decoder of {type(model).__name__}: expected model.get_decoder() or model.model"
        )
    return decoder


def hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
) -> torch.Tensor:
    """The final (already normed) hidden states of a causal LM, without computing logits.

    input_ids: [B, L] int64; attention_mask: [B, L] or None; extra kwargs (``position_ids``, ...) go
    to the decoder. Returns [B, L, H] in the model's dtype, with grad if grad is enabled.
    """
    out = _decoder(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    h = getattr(out, "last_hidden_state", None)
    return h if h is not None else out[0]


def lm_head(model: nn.Module) -> nn.Module:
    """``model.get_output_embeddings()``: [..., H] -> [..., V] (tied to the input embedding when the
    model ties them, so gradients through it reach that shared weight)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None)")
    return head


def _softcap(cap: float) -> Transform:
    def transform(logits: torch.Tensor) -> torch.Tensor:
        return torch.tanh(logits / cap) * cap

    return transform


def logits_transform(model: nn.Module) -> Transform | None:
    """The function the model's forward applies to ``lm_head(h)``, or None when it applies none.

    Replicated: ``final_logit_softcapping`` (Gemma 2/3/4 and others: ``tanh(x / c) * c``), Granite's
    ``x / logits_scaling``, Cohere's ``x * logit_scale``. Raises ValueError naming the model_type for
    architectures known to apply something else.
    """
    hf_config = getattr(model, "config", None)
    if hf_config is None:
        return None
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    types = {getattr(hf_config, "model_type", None), getattr(text, "model_type", None)} - {None}
    for t in sorted(types):
        if t in _UNSUPPORTED:
            raise ValueError(
                f"model_type {t!r} {_UNSUPPORTED[t]} after the LM head; the selective head does not "
                "replicate it, so selective KD is refused for this model"
            )
    transforms: list[Transform] = []
    if types & _DIVIDE_BY_LOGITS_SCALING:
        scale = float(text.logits_scaling)
        transforms.append(lambda x: x / scale)
    if types & _MULTIPLY_BY_LOGIT_SCALE:
        mult = float(text.logit_scale)
        transforms.append(lambda x: x * mult)
    cap = getattr(text, "final_logit_softcapping", None)
    if cap is not None:
        transforms.append(_softcap(float(cap)))
    if not transforms:
        return None
    if len(transforms) == 1:
        return transforms[0]

    def composed(x: torch.Tensor) -> torch.Tensor:
        for f in transforms:
            x = f(x)
        return x

    return composed


def _logits(head: nn.Module, h: torch.Tensor, transform: Transform | None) -> torch.Tensor:
    logits = head(h)
    return transform(logits) if transform is not None else logits


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
        parts.append(fn(_logits(head, hidden_flat[rows], transform), rows))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def chunked_entropy(
    head: nn.Module, hidden: torch.Tensor, chunk: int = 128, transform: Transform | None = None
) -> torch.Tensor:
    """Entropy (nats, temperature 1) of ``softmax(head(hidden))`` per position, ``chunk`` positions at
    a time under no_grad. hidden: [B, L, H] -> [B, L] float32."""
    b, length, h = hidden.shape
    flat = hidden.detach().reshape(b * length, h)
    return chunked_map(head, flat, lambda logits, rows: _entropy(logits), chunk, transform).reshape(b, length)


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
        logp = torch.log_softmax(logits.float(), dim=-1)
        ent = -(logp.exp() * logp).sum(-1)
        lab = flat_labels[rows]
        keep = lab != ignore_index
        ce = -logp.gather(-1, torch.where(keep, lab, 0).unsqueeze(-1)).squeeze(-1)
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
    return _logits(head, hidden[index], transform)


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
        ours = _logits(lm_head(model), hidden, logits_transform(model))
    finally:
        model.train(was_training)
    diff = (ours.float() - ref.float()).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    if not torch.all(diff <= atol + rtol * ref.float().abs()):
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(
            f"selective head differs from model(...).logits for model_type {model_type!r} (max abs diff "
            f"{worst:.3g}): it applies a post-head transform this trainer does not replicate"
        )
    return worst

"""Packed documents that attend only to themselves: the inputs every teacher and student forward gets.

A packed sequence holds the end of one document, whole documents and the start of another
(``doc_start`` marks each document's first token). With ``separate=True`` (``--doc-attention``, the
default of `selkd-cache build` and `selkd-train`) a token attends only to the earlier tokens of its own
document, as if each document had been run alone:

* the position ids restart at 0 at every document start, at the first token of a row and at the first
  padding token (padding is a segment of its own, so no 2-D attention mask is needed);
* the model gets those ``position_ids``, ``attention_mask=None`` and ``use_cache=False``. Transformers
  then finds the segments from the position ids itself (``masking_utils.find_packed_sequence_indices``):
  SDPA and eager get a block-diagonal causal mask ([B, 1, L, L] bool for SDPA, in the model's dtype for
  eager, built once per forward and shared by every layer; flex attention a block mask), and a batch
  whose rows each hold one document keeps the mask-free causal kernel. A 2-D mask or a KV cache would
  switch that detection off, hence ``None`` and ``use_cache=False``. Flash-attention reads packed
  position ids only in a batch of one row (its varlen path), so with B > 1 it would attend across
  documents: :func:`check_separates` runs batches of two rows and refuses it.

With ``separate=False`` the forward is the plain causal one over the whole row (the 2-D padding mask,
default position ids): documents attend across their boundaries, as selkd did before this option.

:func:`check_separates` runs a model once on a tiny pack and refuses it when its forward ignores the
segments (an architecture or attention implementation that does not read packed position ids).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["attention_inputs", "check_separates", "segment_position_ids"]


def segment_position_ids(doc_start: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids that restart at each segment: doc_start [B, L] bool (True at a document's first
    token), attention_mask [B, L] (1 = real token, 0 = padding) or None. A segment starts at a document
    start, at column 0 and wherever the row switches between real tokens and padding (so right and left
    padding each form segments of their own). Returns [B, L] int64: the offset of each token in its segment."""
    start = doc_start.to(torch.bool).clone()
    start[:, 0] = True
    if attention_mask is not None:
        real = attention_mask.to(torch.bool)
        start[:, 1:] |= real[:, 1:] != real[:, :-1]
    col = torch.arange(start.shape[1], device=start.device).expand_as(start)
    last_start = torch.where(start, col, 0).cummax(dim=1).values
    return col - last_start


def attention_inputs(
    doc_start: torch.Tensor | None, attention_mask: torch.Tensor | None, separate: bool
) -> dict[str, Any]:
    """The attention keyword arguments of a causal LM (or decoder) forward: ``position_ids`` with
    ``attention_mask=None`` when ``separate`` (each document attends to itself), else the 2-D
    ``attention_mask`` as given. doc_start, attention_mask: [B, L] or None. Always ``use_cache=False``."""
    if not separate or doc_start is None:
        return {"attention_mask": attention_mask, "use_cache": False}
    return {
        "attention_mask": None,
        "position_ids": segment_position_ids(doc_start, attention_mask),
        "use_cache": False,
    }


@torch.no_grad()
def check_separates(model: nn.Module, what: str) -> None:
    """Refuse a model whose forward lets packed documents attend to each other despite
    :func:`attention_inputs`: the logits of a 6-token document after a 5-token one must be those of the
    document alone (their gap under 1/4 of the gap without separation). Batches of 2 rows, as training
    and the build run them (flash-attention reads packed position ids only in a batch of one row, so it
    is refused here). Three forwards of at most 2 x 11 tokens on the model's device. Raises ValueError
    naming ``what`` (e.g. ``--teacher MODEL``)."""
    device = next(model.parameters()).device
    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids = (torch.arange(11, device=device) * 7919 % min(vocab, 1000)).expand(2, -1)  # any fixed tokens
    doc_start = torch.zeros_like(ids, dtype=torch.bool)
    doc_start[:, 5] = True
    was_training = model.training
    model.eval()  # no dropout in the comparison
    try:
        alone = model(input_ids=ids[:, 5:], use_cache=False).logits.float()
        packed = model(input_ids=ids, **attention_inputs(doc_start, None, True)).logits[:, 5:].float()
        across = model(input_ids=ids, **attention_inputs(doc_start, None, False)).logits[:, 5:].float()
    finally:
        model.train(was_training)
    gap, gap_across = (packed - alone).abs().max().item(), (across - alone).abs().max().item()
    if math.isfinite(gap) and math.isfinite(gap_across) and gap > 0.25 * gap_across:  # NaN weights: checked later
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        raise ValueError(
            f"{what}: {type(model).__name__} (attention {impl}) lets packed documents attend to each other even "
            f"with per-document position ids (logit gap {gap:.3g}, {gap_across:.3g} without separation); "
            "use --no-doc-attention, or attention sdpa, eager or flex_attention"
        )

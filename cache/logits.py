"""A causal LM's logits by parts, and their entropy: one definition for the builder and the trainer.

The builder's sample scorer (:mod:`selkd.cache.scoring`), the class selection (:mod:`selkd.cache.classes`)
and the trainer's selective head (:mod:`selkd.trainer.head`) all read logits as the model's forward
returns them and rank by the same entropy, so the sequences the builder keeps and the positions the
trainer distils are chosen by one number:

* :func:`hidden_states` and :func:`lm_head`: the decoder's final hidden states and the head, so that
  logits can be made a chunk of positions at a time (``[B, L, V]`` is never built);
* :func:`logits_transform`: what a few architectures do to ``lm_head(h)`` inside their forward
  (Gemma-2-style final soft-capping, Granite's ``logits_scaling`` division, Cohere's ``logit_scale``
  multiplication); architectures known to do something else are refused;
* :func:`softmax_entropy`: softmax, log-normaliser and entropy in one fused pass;
* :class:`TeacherHead`: the builder's (and an online teacher's) head, applied a chunk of positions at a
  time into one reused buffer on the head's device, so that the teacher's ``[B, L, V]`` logits never exist.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = [
    "SoftmaxEntropy",
    "TeacherHead",
    "Transform",
    "apply_head",
    "hidden_states",
    "input_device",
    "lm_head",
    "logits_transform",
    "softmax_entropy",
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
# Known post-head transforms this module does not replicate: refused.
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
# Below this (relative to a row's largest logit) exp() is 0 in float32 anyway; flooring there keeps
# masked (-inf) classes from turning 0 * -inf into NaN in the entropy's dot product.
_LOGIT_FLOOR = -1e4


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
    kwargs = {"use_cache": False, **kwargs}
    out = _decoder(model)(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
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
                f"model_type {t!r} {_UNSUPPORTED[t]} after the LM head; selkd does not replicate that on "
                "logits it computes a chunk at a time, so this model cannot be a student or a sample scorer"
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


def apply_head(head: nn.Module, hidden: torch.Tensor, transform: Transform | None) -> torch.Tensor:
    """``model(...).logits`` at the given positions: hidden [..., H] -> logits [..., V] (head's dtype)."""
    logits = head(hidden)
    return transform(logits) if transform is not None else logits


class SoftmaxEntropy(NamedTuple):
    probs: torch.Tensor  # [..., V] float32, softmax(logits)
    lse: torch.Tensor  # [...] float32, logsumexp(logits)
    entropy: torch.Tensor  # [...] float32, nats (temperature 1)


def softmax_entropy(logits: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None) -> SoftmaxEntropy:
    """Softmax, log-normaliser and entropy of logits [..., V] (any float dtype; math in float32), in one
    fused pass instead of log_softmax + exp + product: ``H = log z - sum(p * (x - max))``. Masked
    (``-inf``) classes are allowed; no host sync, so it can run per chunk inside a training step.

    ``out``: two float32 buffers of the logits' shape (scratch reused over a loop of chunks, so that no
    [..., V] temporary is allocated per call): the first receives the shifted logits, the second the
    probabilities returned."""
    x = logits.float()
    m = x.amax(-1, keepdim=True)
    shifted = torch.sub(x, m, out=out[0]) if out is not None else x - m
    shifted.clamp_(min=_LOGIT_FLOOR)
    p = torch.exp(shifted, out=out[1]) if out is not None else torch.exp(shifted)
    z = p.sum(-1, keepdim=True)
    p.div_(z)
    log_z = z.log().squeeze(-1)
    entropy = (log_z - torch.linalg.vecdot(p, shifted)).clamp_(min=0)
    return SoftmaxEntropy(p, m.squeeze(-1) + log_z, entropy)


def _module_device(module: nn.Module) -> torch.device:
    """Where a module computes: accelerate's execution device when a device map placed it (its weights
    may be offloaded to the CPU or disk, with ``meta`` placeholders), else its first parameter's device."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where a model's token ids go: its input embedding's device (under a device map, the device the
    embedding runs on, though its weights may be offloaded)."""
    return _module_device(model.get_input_embeddings())


class TeacherHead:
    """A frozen causal LM run as decoder, then head a chunk of positions at a time.

    ``decode`` gives the final hidden states [B, L, H]; ``chunks`` turns a sequence's [T, H] hidden states
    into logits [c, V] (c <= ``chunk`` positions) written into one buffer that is reused for every chunk
    and batch (``torch.mm(..., out=)``), with the model's post-head transform applied. The buffer is
    overwritten by the next chunk: use each chunk before asking for the next. Models whose post-head
    transform :func:`logits_transform` does not replicate, or that have no output embeddings, run their
    whole forward instead (``decode`` returns the logits, ``chunks`` slices them).

    ``input_device``: where the token ids go (the embedding's device, also under a device map);
    ``device``: where logits come out, so where class selection runs and its generator lives.
    """

    def __init__(self, model: nn.Module, chunk: int) -> None:
        self.model = model
        try:
            self.transform, self.head = logits_transform(model), lm_head(model)
        except ValueError:
            self.transform, self.head = None, None  # the forward's own logits, whole
        self.chunk = chunk  # positions per head matmul (--head-chunk-tokens)
        self.input_device = input_device(model)
        self.device = _module_device(self.head) if self.head is not None else self.input_device
        self._out: torch.Tensor | None = None

    def decode(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """[B, L] ids -> [B, L, H] final hidden states ([B, L, V] logits for a whole-forward model)."""
        if self.head is None:
            return self.model(input_ids=input_ids, use_cache=False, **kwargs).logits
        return hidden_states(self.model, input_ids, **kwargs)

    def chunks(self, hidden: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, logits [c, V] of positions start .. start + c - 1) for hidden [T, H] or [B, T, H] (from
        ``decode``; a batch's positions are numbered one sequence after another, and a chunk may span
        two sequences, so that every head matmul but the last has ``chunk`` positions)."""
        if self.head is None:  # whole-forward logits: sliced per sequence (flattening would copy them)
            rows = hidden.unsqueeze(0) if hidden.dim() == 2 else hidden
            for b, row in enumerate(rows):
                for s in range(0, row.shape[0], self.chunk):
                    yield b * row.shape[0] + s, row[s : s + self.chunk]
            return
        flat = hidden.reshape(-1, hidden.shape[-1])
        for s in range(0, flat.shape[0], self.chunk):
            yield s, self._logits(flat[s : s + self.chunk])

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        w = getattr(self.head, "weight", None)
        if type(self.head) is not nn.Linear or self.head.bias is not None or w is None or w.device.type == "meta":
            return apply_head(self.head, h.to(self.device), self.transform)  # type: ignore[arg-type]
        if self._out is None or self._out.dtype != w.dtype:
            self._out = torch.empty((self.chunk, w.shape[0]), dtype=w.dtype, device=w.device)
        logits = torch.mm(h.to(w.device), w.t(), out=self._out[: h.shape[0]])
        return self.transform(logits) if self.transform is not None else logits

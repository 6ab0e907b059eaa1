"""Tests of selkd.trainer.head: the selective LM head equals the model's own logits and gradients."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from selkd.cache.classes import ClassSpec, teacher_outputs
from selkd.cache.logits import softmax_entropy
from selkd.cache.scoring import mean_entropy
from selkd.trainer.head import (
    check_selective_head,
    chunked_divergence,
    chunked_entropy,
    chunked_map,
    chunked_token_stats,
    hidden_states,
    lm_head,
    logits_transform,
    selected_logits,
)
from selkd.trainer.losses import fkl, masked_mean

V, B, L = 48, 3, 11
SMALL = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _llama(tied: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=tied))
    return model.float().eval()


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 8:] = 0  # right padding in one row
    return ids, mask


@pytest.mark.parametrize("tied", [False, True])
def test_hidden_states_then_head_equals_model_logits(tied: bool) -> None:
    model = _llama(tied)
    ids, mask = _batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        h = hidden_states(model, ids, mask)
        assert h.shape == (B, L, 32)
        ours = lm_head(model)(h)
    assert logits_transform(model) is None
    assert torch.allclose(ours, ref, atol=1e-5)
    assert check_selective_head(model, ids, mask) < 1e-5


def test_chunked_entropy_equals_direct_entropy() -> None:
    model = _llama(False)
    ids, mask = _batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    logp = torch.log_softmax(logits.float(), -1)
    direct = -(logp.exp() * logp).sum(-1)
    h = hidden_states(model, ids, mask)  # with grad: chunked_entropy must not keep a graph
    for chunk in (1, 7, 128):
        ent = chunked_entropy(lm_head(model), h, chunk=chunk)
        assert ent.shape == (B, L) and ent.dtype == torch.float32 and not ent.requires_grad
        assert torch.allclose(ent, direct, atol=1e-5)


def test_chunked_token_stats_entropy_and_ce() -> None:
    model = _llama(False)
    ids, mask = _batch()
    labels = torch.cat([ids[:, 1:], torch.full((B, 1), -100)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        h = hidden_states(model, ids, mask)
    stats = chunked_token_stats(lm_head(model), h, labels, chunk=5)
    logp = torch.log_softmax(logits, -1)
    assert torch.allclose(stats.entropy, -(logp.exp() * logp).sum(-1), atol=1e-5)
    ce = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none").reshape(B, L)
    assert torch.allclose(stats.ce, ce, atol=1e-5)
    assert torch.all(stats.ce[:, -1] == 0)
    with pytest.raises(ValueError, match="labels"):
        chunked_token_stats(lm_head(model), h, labels[:, :-1])


def test_chunked_map_general() -> None:
    head = torch.nn.Linear(4, 6, bias=False)
    h = torch.randn(10, 4)
    out = chunked_map(head, h, lambda logits, rows: logits.argmax(-1) + rows.start * 0, chunk=3)
    assert torch.equal(out, head(h).argmax(-1))


@pytest.mark.parametrize("tied", [False, True])
def test_selective_head_same_loss_and_gradients(tied: bool) -> None:
    ids, mask = _batch()
    valid = mask.bool().clone()
    valid[:, -1] = False
    g = torch.Generator().manual_seed(2)
    select = valid & (torch.rand(B, L, generator=g) < 0.4)
    assert select.sum() > 2
    t_logits = torch.randn(B, L, V, generator=g) * 2
    targets = teacher_outputs(t_logits.reshape(-1, V), ids.reshape(-1), ClassSpec("topk", 5)).targets
    targets_sel = targets.select(select.reshape(-1))

    full = _llama(tied, seed=3)
    full.train()
    logits = full(input_ids=ids, attention_mask=mask).logits  # [B, L, V], the reference path
    loss_full = masked_mean(fkl(logits[select], targets_sel))
    loss_full.backward()

    sel = _llama(tied, seed=3)
    sel.train()
    h = hidden_states(sel, ids, mask)
    s_logits = selected_logits(lm_head(sel), h, select)
    assert s_logits.shape == (int(select.sum()), V)
    loss_sel = masked_mean(fkl(s_logits, targets_sel))
    loss_sel.backward()

    assert torch.allclose(loss_sel, loss_full, atol=1e-6)
    ref_grads = dict(full.named_parameters())
    for name, p in sel.named_parameters():
        assert p.grad is not None, name
        assert torch.allclose(p.grad, ref_grads[name].grad, atol=1e-6), name
    emb = sel.get_input_embeddings().weight
    assert (emb is lm_head(sel).weight) == tied
    assert emb.grad.abs().sum() > 0

    # (b_idx, t_idx) indexing gives the same rows
    b_idx, t_idx = select.nonzero(as_tuple=True)
    with torch.no_grad():
        assert torch.allclose(selected_logits(lm_head(sel), h, (b_idx, t_idx)), s_logits)
    with pytest.raises(ValueError, match="bool mask"):
        selected_logits(lm_head(sel), h, select.long())


def test_chunked_divergence_matches_full_logits() -> None:
    model = _llama(False)
    ids, mask = _batch()
    valid = mask.bool()
    g = torch.Generator().manual_seed(4)
    t_logits = torch.randn(B * L, V, generator=g)
    targets = teacher_outputs(t_logits, ids.reshape(-1), ClassSpec("full")).targets
    targets_bl = replace(targets, logprobs=targets.logprobs.reshape(B, L, V))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        h = hidden_states(model, ids, mask)
    out = chunked_divergence(lm_head(model), h, targets_bl, fkl, valid=valid, chunk=4)
    ref = fkl(logits.reshape(-1, V), targets).reshape(B, L)
    assert torch.allclose(out[valid], ref[valid], atol=1e-5)
    assert torch.all(out[~valid] == 0)


def test_gemma2_softcapping_is_replicated() -> None:
    torch.manual_seed(5)
    cfg = Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=3.0)
    model = Gemma2ForCausalLM(cfg).float().eval()
    ids, mask = _batch()
    assert logits_transform(model) is not None
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    assert ref.abs().max() <= 3.0
    assert check_selective_head(model, ids, mask) < 1e-5
    h = hidden_states(model, ids, mask)
    sel = selected_logits(lm_head(model), h, mask.bool(), logits_transform(model))
    assert torch.allclose(sel, ref[mask.bool()], atol=1e-5)


def test_sample_scorer_ranks_by_the_models_own_logits() -> None:
    """The builder's sample scorer applies the post-head transform (here Gemma-2 soft-capping), so it ranks
    sequences by the entropy of ``model(...).logits``, the entropy the trainer selects by."""
    torch.manual_seed(7)
    model = Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=2.0)).float().eval()
    ids, _ = _batch()
    with torch.no_grad():
        lm_head(model).weight.mul_(50)  # raw logits of several units, so the cap at 2 changes the entropy
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
        raw = torch.log_softmax(lm_head(model)(hidden_states(model, ids))[:, :-1].float(), -1)
    want = -(logp.exp() * logp).sum(-1).mean(-1)
    assert not torch.allclose(-(raw.exp() * raw).sum(-1).mean(-1), want, atol=1e-3)  # the cap matters here
    for chunk in (4, 128):
        torch.testing.assert_close(mean_entropy(model, ids, chunk=chunk), want, atol=1e-5, rtol=1e-5)
    h = hidden_states(model, ids)
    torch.testing.assert_close(
        chunked_entropy(lm_head(model), h, chunk=4, transform=logits_transform(model))[:, :-1].mean(-1), want
    )


def test_softmax_entropy_of_masked_classes() -> None:
    """-inf logits (masked classes) have probability 0 and add nothing: the entropy is the finite classes'."""
    logits = torch.randn(6, 40) * 4
    masked = logits.clone()
    masked[:, 25:] = float("-inf")
    probs, lse, ent = softmax_entropy(masked)
    logp = torch.log_softmax(logits[:, :25], -1)
    torch.testing.assert_close(ent, -(logp.exp() * logp).sum(-1))
    torch.testing.assert_close(lse, torch.logsumexp(logits[:, :25], -1))
    assert torch.all(probs[:, 25:] == 0) and torch.isfinite(ent).all()
    half = softmax_entropy(logits.half())  # any float dtype, math in float32
    assert half.entropy.dtype == torch.float32
    torch.testing.assert_close(half.entropy, softmax_entropy(logits.half().float()).entropy)


def test_granite_logits_scaling_is_replicated() -> None:
    torch.manual_seed(6)
    model = GraniteForCausalLM(GraniteConfig(**SMALL, logits_scaling=4.0)).float().eval()
    ids, mask = _batch()
    assert check_selective_head(model, ids, mask) < 1e-5


def test_unknown_or_unsupported_transforms_are_refused() -> None:
    model = _llama(False)
    ids, mask = _batch()

    class Scaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    torch.manual_seed(0)
    scaled = Scaled(model.config).eval()
    with pytest.raises(ValueError, match="post-head transform"):
        check_selective_head(scaled, ids, mask)

    model.config.model_type = "recurrent_gemma"
    with pytest.raises(ValueError, match="recurrent_gemma"):
        logits_transform(model)


def test_lm_head_missing_is_an_error() -> None:
    with pytest.raises(ValueError, match="output embeddings"):
        lm_head(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="decoder"):
        hidden_states(torch.nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long))

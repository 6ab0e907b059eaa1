"""The demo's tokenizer and Llama models: training them from nothing, and scoring held-out text."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selkd.trainer.demo.settings import EOS_TOKEN, PAD_TOKEN, Shape
from selkd.trainer.demo.util import say


def train_tokenizer(
    texts: Sequence[str], vocab: int, out_dir: Path | None = None, extra_special: Sequence[str] = ()
) -> Any:
    """A byte-level BPE (GPT-2/Qwen style: no unknown tokens, any text round-trips; ``<|endoftext|>`` is
    eos and bos, ``<|pad|>`` pad, then ``extra_special``), saved with ``save_pretrained`` into ``out_dir``
    if given, so every selkd command loads it like any Hugging Face tokenizer. ``vocab`` counts the
    special tokens and the 256 byte symbols. Deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = [EOS_TOKEN, PAD_TOKEN, *extra_special]
    min_size = 256 + len(special) + 1
    if vocab < min_size:
        raise ValueError(f"vocab_size must be at least {min_size} (256 bytes + special tokens + 1 merge)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    extra = {"additional_special_tokens": list(extra_special)} if extra_special else {}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=1 << 30,
        **extra,
    )
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def special_ids(tokenizer: Any) -> dict[str, int | None]:
    """The tokenizer's bos/eos/pad ids as model config keys."""
    return {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad")}


def make_llama(
    shape: Shape, vocab: int, max_pos: int, seed: int, *, kv_heads: int | None = None, tie: bool = False, **ids: Any
) -> Any:
    """A randomly initialised Llama of ``vocab`` logits (same arguments, same weights; the global RNG is
    left alone). ``kv_heads`` defaults to ``shape.heads``; ``tie`` shares input and output embeddings;
    ``ids``: bos/eos/pad token ids (:func:`special_ids`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads if kv_heads is None else kv_heads,
        max_position_embeddings=max_pos,
        tie_word_embeddings=tie,
        **ids,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def save_model(model: Any, tokenizer: Any | None, out_dir: Path | str) -> Path:
    """``save_pretrained`` the model (safetensors) and the tokenizer into one directory.

    The model's bos/eos/pad ids are set from the tokenizer first, so that generation and the saved
    config agree with the tokenizer that ships next to them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        for key, tid in special_ids(tokenizer).items():
            setattr(model.config, key, tid)
            if getattr(model, "generation_config", None) is not None:
                setattr(model.generation_config, key, tid)
    model.save_pretrained(str(out), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def ce_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> torch.Tensor:
    """One optimizer step of plain next-token CE on token ids ``x`` [B, L] (gradient norm clipped at 1);
    returns the loss, still on the device."""
    loss = model(input_ids=x, labels=x, use_cache=False).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss


def pretrain_lm(
    model: torch.nn.Module,
    pool: np.ndarray,
    seconds: float,
    batch: int,
    lr: float,
    seed: int,
    warmup: int = 20,
    min_lr_ratio: float = 0.1,
    report: Callable[[str], None] = say,
) -> dict[str, Any]:
    """Plain next-token CE for ``seconds`` of wall time on random rows of ``pool`` ([N, L] tokens).

    Time-budgeted rather than step-budgeted, so that the first run's duration is the same on any
    machine; the learning rate follows a cosine over *elapsed time* (after ``warmup`` steps), so the
    run always ends annealed. Returns the loss curve and what was spent."""
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    curve: list[list[float]] = []
    step, tokens, window, n_window = 0, 0, 0.0, 0
    t0 = time.perf_counter()
    next_report = t0 + 15.0
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and step > 0:
            break
        progress = min(1.0, elapsed / seconds)
        scale = min(1.0, (step + 1) / warmup) * (
            min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        )
        for group in opt.param_groups:
            group["lr"] = lr * scale
        x = torch.from_numpy(pool[rng.integers(0, len(pool), batch)].astype(np.int64))
        loss = ce_step(model, opt, x)
        step += 1
        tokens += x.numel()
        window += float(loss.detach())
        n_window += 1
        if step % 10 == 0:
            curve.append([step, time.perf_counter() - t0, window / n_window])
            window, n_window = 0.0, 0
        if time.perf_counter() >= next_report:
            last = curve[-1][2] if curve else float(loss.detach())
            report(f"      {time.perf_counter() - t0:5.0f} s  step {step:>5}  train CE {last:.3f}")
            next_report += 15.0
    if n_window:
        curve.append([step, time.perf_counter() - t0, window / n_window])
    model.eval()
    return {"steps": step, "tokens": tokens, "seconds": time.perf_counter() - t0, "curve": curve}


@torch.no_grad()
def score_sequences(
    model: torch.nn.Module, seqs: Sequence[np.ndarray], reference: Sequence[torch.Tensor] | None = None, batch: int = 16
) -> tuple[float, float | None, list[torch.Tensor]]:
    """Held-out CE (nats per next-token position) of ``model`` on ``seqs``, its top-1 agreement with
    ``reference`` (the teacher's argmax per position) and its own argmax per sequence.

    The same positions as the trainer's evaluation (every position that has a next token), scored
    the same way for teacher, base and trained students, so the table compares like with like."""
    model.eval()
    ce_sum, agree_sum, n = 0.0, 0.0, 0
    argmax: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    lengths = np.array([len(s) for s in seqs])
    for length in np.unique(lengths):
        rows = np.flatnonzero(lengths == length)
        for s in range(0, len(rows), batch):
            idx = rows[s : s + batch]
            x = torch.from_numpy(np.stack([seqs[i] for i in idx]).astype(np.int64))
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            labels = x[:, 1:]
            ce = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
            )
            ce_sum += float(ce)
            n += labels.numel()
            top = logits.argmax(-1)
            for j, i in enumerate(idx):
                argmax[i] = top[j]
                if reference is not None:
                    agree_sum += float((top[j] == reference[i]).sum())
    ce_mean = ce_sum / max(n, 1)
    return ce_mean, (agree_sum / max(n, 1) if reference is not None else None), argmax

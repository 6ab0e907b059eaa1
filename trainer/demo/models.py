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


def train_tokenizer(texts: Sequence[str], vocab: int, out_dir: Path) -> Any:
    """A byte-level BPE (no unknown tokens; ``<|endoftext|>`` is eos and bos, ``<|pad|>`` pad), saved
    with ``save_pretrained`` so every selkd command loads it like any Hugging Face tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN, model_max_length=1 << 30
    )
    fast.save_pretrained(str(out_dir))
    return fast


def make_llama(shape: Shape, tokenizer: Any, max_pos: int, seed: int) -> Any:
    """A randomly initialised Llama (same arguments, same weights; the global RNG is left alone)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=max_pos,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
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

#!/usr/bin/env python
"""Make a tiny teacher, a tinier student and a text corpus, all offline, in seconds.

The files look like any Hugging Face checkpoint (config.json, model.safetensors, tokenizer.json), so
every selkd command can be tried end to end on a laptop before pointing it at a real model:

    python tools/make_tiny.py --out out/tiny
    # -> out/tiny/teacher/  (Llama, model + tokenizer)
    #    out/tiny/student/  (smaller Llama, same tokenizer)
    #    out/tiny/corpus.jsonl  ({"text": ...} rows of Python standard-library source)

The corpus is the running interpreter's standard library, so nothing is downloaded. ``--train-steps N``
trains the teacher briefly so that its distributions are not those of a random model.

It is also imported by the tests (``tests/conftest.py`` puts ``tools/`` on ``sys.path``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import transformers
from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

# The library's demo owns the corpus rules, the tokenizer and model recipes and saving; this script
# adds the ChatML chat template and the step-budgeted teacher training, and keeps the names the tests
# and benchmarks import.
from selkd.trainer.demo import chunk_text
from selkd.trainer.demo.corpus import stdlib_documents as stdlib_files
from selkd.trainer.demo.corpus import write_rows
from selkd.trainer.demo.models import make_llama as _demo_llama
from selkd.trainer.demo.models import n_params, save_model, special_ids, train_tokenizer
from selkd.trainer.demo.settings import EOS_TOKEN, PAD_TOKEN, Shape
from selkd.trainer.demo.util import human_bytes

__all__ = [
    "CHAT_TEMPLATE",
    "chunk_text",
    "main",
    "make_llama",
    "save_model",
    "special_ids",
    "stdlib_files",
    "stdlib_texts",
    "train_bpe_tokenizer",
    "train_lm",
    "write_jsonl",
]

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# ChatML-style template. The {% generation %} markers let `apply_chat_template(...,
# return_assistant_tokens_mask=True)` mark the assistant tokens, which chat distillation needs.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def stdlib_texts(max_files: int | None = None, max_bytes: int | None = None) -> list[str]:
    """The sources of :func:`stdlib_files`: a deterministic, offline, license-clean text corpus."""
    return [text for _, text in stdlib_files(max_files=max_files, max_bytes=max_bytes)]


def write_jsonl(path: Path, texts: Iterable[str]) -> int:
    """Write ``{"text": ...}`` rows; returns the number of rows."""
    rows = list(texts)
    write_rows(path, rows)
    return len(rows)


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: Path | str | None = None
) -> PreTrainedTokenizerFast:
    """The demo's byte-level BPE plus ``<|im_start|>``/``<|im_end|>`` and the ChatML chat template.

    ``vocab_size`` counts all special tokens plus the 256 byte symbols. Saved with ``save_pretrained``
    when ``out_dir`` is given."""
    fast = train_tokenizer(list(texts), vocab_size, extra_special=(IM_START, IM_END))
    fast.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def make_llama(
    vocab_size: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    max_pos: int = 1024,
    seed: int = 0,
    tie: bool = False,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> LlamaForCausalLM:
    """The demo's randomly initialised Llama, in eval mode; the same arguments always give the same weights.

    The global torch RNG is left untouched, so building a fixture model does not change the random
    stream of the code under test. ``intermediate`` defaults to ``4 * hidden``; ``tie=True`` shares
    input and output embeddings, which keeps huge-vocab models small."""
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    kv = heads if kv_heads is None else kv_heads
    if heads % kv:
        raise ValueError(f"heads ({heads}) must be divisible by kv_heads ({kv})")
    shape = Shape(hidden, layers, heads, intermediate if intermediate is not None else 4 * hidden)
    ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    return _demo_llama(shape, vocab_size, max_pos, seed, kv_heads=kv, tie=tie, **ids).eval()


def train_lm(
    model: PreTrainedModel,
    token_ids: Sequence[int],
    steps: int,
    batch: int = 8,
    seq_len: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    log_every: int = 10,
) -> list[float]:
    """Plain next-token cross-entropy with AdamW on random windows of one token stream.

    Enough to give a tiny teacher peaked, text-like distributions (a random model's are near uniform,
    which makes distillation demos meaningless). Returns the loss of every step."""
    data = torch.tensor(list(token_ids), dtype=torch.long)
    if data.numel() < seq_len:
        raise ValueError(f"need at least {seq_len} tokens to train, got {data.numel()}")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        starts = torch.randint(0, data.numel() - seq_len + 1, (batch,), generator=gen)
        windows = torch.stack([data[s : s + seq_len] for s in starts.tolist()])
        out = model(input_ids=windows, labels=windows, use_cache=False)  # the model shifts labels itself
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(out.loss.detach()))
        if step == 1 or step % log_every == 0 or step == steps:
            print(
                f"  step {step:>5}/{steps}  loss {losses[-1]:.3f}  ({time.perf_counter() - t0:.1f}s)",
                flush=True,
            )
    model.eval()
    return losses


# ----------------------------------------------------------------------------- CLI


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_tiny.py",
        description="Write a tiny Llama teacher, a smaller student (same tokenizer) and a text corpus.",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    p.add_argument(
        "--vocab",
        type=int,
        default=512,
        help="BPE vocabulary size, special tokens included (default: %(default)s)",
    )
    p.add_argument("--hidden", type=int, default=64, help="teacher hidden size (default: %(default)s)")
    p.add_argument("--layers", type=int, default=2, help="teacher layers (default: %(default)s)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (teacher and student) (default: %(default)s)")
    p.add_argument("--student-hidden", type=int, default=None, help="student hidden size (default hidden/2)")
    p.add_argument("--student-layers", type=int, default=None, help="student layers (default layers/2)")
    p.add_argument("--max-pos", type=int, default=1024, help="max positions of both models (default: %(default)s)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="teacher init seed; the student uses seed+1 (default: %(default)s)",
    )
    p.add_argument(
        "--corpus-bytes",
        type=int,
        default=300_000,
        help="size of corpus.jsonl (stdlib source) (default: %(default)s)",
    )
    p.add_argument("--chunk-chars", type=int, default=4000, help="max characters per corpus row (default: %(default)s)")
    p.add_argument(
        "--train-steps",
        type=int,
        default=0,
        help="train the teacher this many CE steps (default: %(default)s)",
    )
    p.add_argument("--batch", type=int, default=8, help="training batch size (sequences) (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="training sequence length (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="training learning rate (AdamW) (default: %(default)s)")
    return p


def _usage_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the options, if anything (one line, exit 2)."""
    for name in ("vocab", "hidden", "layers", "heads", "max_pos", "corpus_bytes", "chunk_chars", "batch", "seq_len"):
        if getattr(args, name) <= 0:
            return f"--{name.replace('_', '-')} must be positive"
    if args.train_steps < 0:
        return "--train-steps must be >= 0"
    for label, h in (("--hidden", args.hidden), ("--student-hidden", args.student_hidden)):
        if h % args.heads or (h // args.heads) % 2:
            return f"{label} {h} must be a multiple of --heads {args.heads} with an even head size"
    return None


def _corpus(args: argparse.Namespace, path: Path) -> tuple[list[str], int]:
    """Standard-library sources (about ``--corpus-bytes``) as ``{"text": ...}`` rows of at most
    ``--chunk-chars`` in ``path``: the texts and the number of rows."""
    print(f"[1/4] reading standard-library sources (~{human_bytes(args.corpus_bytes)}) ...", flush=True)
    files = stdlib_files(max_bytes=args.corpus_bytes)
    texts = [t for _, t in files]
    n_rows = write_jsonl(path, [piece for t in texts for piece in chunk_text(t, args.chunk_chars)])
    print(f"      {len(files)} files -> {n_rows} rows in {path}", flush=True)
    return texts, n_rows


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.student_hidden = args.student_hidden or max(args.heads * 4, args.hidden // 2)
    args.student_layers = args.student_layers or max(1, args.layers // 2)
    problem = _usage_error(args)
    if problem is not None:
        print(f"make_tiny.py: error: {problem}", file=sys.stderr)
        return 2

    transformers.utils.logging.disable_progress_bar()  # our own progress lines are enough
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    corpus_path = out / "corpus.jsonl"
    texts, n_rows = _corpus(args, corpus_path)

    print(f"[2/4] training a byte-level BPE tokenizer (vocab {args.vocab}) ...", flush=True)
    try:
        tok = train_bpe_tokenizer(texts, args.vocab)
    except ValueError as e:
        print(f"make_tiny.py: error: --vocab: {e}", file=sys.stderr)
        return 2
    ids: list[int] = []
    for t in texts:
        ids.extend(tok(t, add_special_tokens=False)["input_ids"])
        ids.append(tok.eos_token_id)
    print(f"      {len(tok)} tokens; corpus = {len(ids):,} tokens ({sum(map(len, texts)) / len(ids):.2f} chars/token)")

    shared = {"heads": args.heads, "max_pos": args.max_pos, **special_ids(tok)}
    print(f"[3/4] building the teacher (hidden {args.hidden}, {_plural(args.layers, 'layer')}) ...", flush=True)
    teacher = make_llama(len(tok), hidden=args.hidden, layers=args.layers, seed=args.seed, **shared)
    if args.train_steps > 0:
        if len(ids) < args.seq_len:
            print("make_tiny.py: error: corpus too small for --seq-len; raise --corpus-bytes", file=sys.stderr)
            return 2
        print(
            f"      training {args.train_steps} steps (batch {args.batch} x {args.seq_len}, lr {args.lr}); "
            f"a uniform model would score {math.log(len(tok)):.3f}",
            flush=True,
        )
        train_lm(teacher, ids, args.train_steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr, seed=args.seed)
    teacher_dir = save_model(teacher, tok, out / "teacher")

    s_hidden, s_layers = args.student_hidden, args.student_layers
    print(f"[4/4] building the student (hidden {s_hidden}, {_plural(s_layers, 'layer')}) ...", flush=True)
    student = make_llama(len(tok), hidden=s_hidden, layers=s_layers, seed=args.seed + 1, **shared)
    student_dir = save_model(student, tok, out / "student")

    trained = f", trained {args.train_steps} steps" if args.train_steps else ", random init"
    print(f"\ndone in {time.perf_counter() - t0:.1f}s; wrote {out}/")
    t_size, s_size = human_bytes(_dir_size(teacher_dir)), human_bytes(_dir_size(student_dir))
    print(f"  teacher/      {n_params(teacher):>9,} params{trained}  ({t_size})")
    print(f"  student/      {n_params(student):>9,} params, random init  ({s_size})")
    print(f'  corpus.jsonl  {n_rows:>9,} rows of {{"text": ...}}  ({human_bytes(corpus_path.stat().st_size)})')
    print(
        f"  tokenizer     byte-level BPE, {len(tok)} tokens, eos=bos={EOS_TOKEN} pad={PAD_TOKEN}, ChatML chat template"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The teacher forward's cost of packing without cross-document attention (``--doc-attention``).

The same packed batches of a stdlib corpus cut into documents of at most ``--doc-chars`` characters run
through a random-weight Llama-style teacher, ``model(input_ids, **attention_inputs(doc_start, None, on))``
as the build runs it, on and off in turn for ``--repeats`` rounds (so a busy machine slows both alike);
the median positions/s of each is printed as a markdown table with the machine and the command.

    python tools/bench_doc_attention.py [--hidden 512] [--layers 4] [--seq-len 512] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_tiny import chunk_text, make_llama, stdlib_texts, train_bpe_tokenizer, write_jsonl

from selkd.cache.corpus import load_corpus
from selkd.cache.doc_attention import attention_inputs


def timed_pass(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], on: bool) -> float:
    """Seconds for one forward over every batch (logits reduced to a number, as the build waits for them)."""
    start = time.perf_counter()
    with torch.no_grad():
        for x, doc_start in batches:
            model(input_ids=x, **attention_inputs(doc_start, None, on)).logits.float().sum().item()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--doc-chars", type=int, default=1000, help="cut documents at this many characters")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    args = ap.parse_args(argv)

    texts = stdlib_texts(max_bytes=2_000_000)
    tok = train_bpe_tokenizer(texts[:400], 4096)
    path = Path(f"/tmp/selkd-bench-doc-attention-{args.doc_chars}.jsonl")
    write_jsonl(path, [p for t in texts for p in chunk_text(t, args.doc_chars)])
    n_seqs = args.batch_size * args.batches
    corpus = load_corpus([str(path)], tok, args.seq_len, limit_tokens=(n_seqs + 1) * args.seq_len, progress=False)
    path.unlink()
    idx = np.arange(n_seqs)
    batches = [
        (
            torch.from_numpy(np.stack([corpus.sequence(i) for i in b]).astype(np.int64)),
            torch.from_numpy(np.stack([corpus.sequence_doc_start(i) for i in b])),
        )
        for b in np.split(idx, args.batches)
    ]
    segments = np.mean([corpus.sequence_doc_start(i)[1:].sum() + 1 for i in idx])
    model = make_llama(args.vocab, hidden=args.hidden, layers=args.layers, heads=max(4, args.hidden // 64), seed=0)
    model.set_attn_implementation(args.attn)
    model.eval()
    timed_pass(model, batches[:1], True)  # warm-up
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        for on in (True, False):
            seconds[on].append(timed_pass(model, batches, on))
    positions = n_seqs * args.seq_len
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"### Teacher forward with and without --doc-attention ({n_params / 1e6:.1f}M-parameter Llama, hidden "
        f"{args.hidden}, {args.layers} layers, V = {args.vocab:,}, {args.attn}, batch {args.batch_size} x "
        f"{args.seq_len}, {segments:.2f} documents (or pieces) per sequence)\n"
    )
    print(f"machine: {platform.machine()} ({torch.get_num_threads()} CPU threads); torch {torch.__version__}")
    print(f"command: `python {' '.join(sys.argv)}`\n")
    print("| doc attention | median positions/s | min-max positions/s |")
    print("|---|---|---|")
    for on in (True, False):
        rates = positions / np.array(seconds[on])
        print(f"| {'on' if on else 'off'} | {np.median(rates):,.0f} | {rates.min():,.0f}-{rates.max():,.0f} |")
    ratio = np.median(np.array(seconds[False]) / np.array(seconds[True]))
    print(f"\nmedian of the per-round ratios (off time / on time): {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

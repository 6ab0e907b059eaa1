"""Build throughput against a bare teacher forward pass over the same sequences, same machine.

A Llama-style teacher (random weights: speed does not depend on them) with a padded vocabulary
larger than its tokenizer (like Qwen's), the stdlib corpus, and the same batches. The bare pass
only runs ``model(input_ids).logits``; the build runs ``selkd-cache build``'s teacher pass
(forward, class selection, encoding, writing, committing) and is timed the same way (model load and
tokenization excluded from both). ``--doc-attention both`` builds each class mode twice, with
packed documents attending only to themselves (``--doc-attention``, the default) and across them
(``--no-doc-attention``); ``--doc-chars`` cuts the corpus into documents of at most that many
characters, so that sequences hold several. Prints a markdown table with the machine and the command.

    python tools/bench_build.py [--hidden 512] [--layers 4] [--vocab 32768] [--classes sample:50 topk:64]
        [--doc-attention on|off|both] [--doc-chars 1000] [--tokenizer-classes 151665] [--head-chunk-tokens 256]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_tiny import chunk_text, make_llama, save_model, stdlib_texts, train_bpe_tokenizer, write_jsonl

from selkd.cache.build import build_cache
from selkd.cache.config import BuildConfig
from selkd.cache.corpus import load_corpus
from selkd.cache.teacher import load_causal_lm, load_tokenizer


def bare_forward(model: torch.nn.Module, seqs: np.ndarray, batch: int, device: torch.device) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(seqs), batch):
            x = torch.from_numpy(seqs[s : s + batch].astype(np.int64)).to(device)
            model(input_ids=x).logits.float().sum().item()  # .item(): wait for the device like the build does
    return time.perf_counter() - start


class PeakRss:
    """The process's resident memory above what it held on entry, at its highest (sampled every 2 ms from
    /proc/self/statm: Linux only; 0 elsewhere): what a build needs beyond the loaded teacher."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * 4096
        except OSError:
            return 0

    def _watch(self) -> None:
        base = self._rss()
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss() - base)

    def __enter__(self) -> PeakRss:
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32768, help="teacher logits dimension (padded vocabulary)")
    ap.add_argument("--tokens", type=int, default=65536, help="corpus tokens")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--classes", nargs="+", default=["sample:50", "topk:64"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--doc-attention", choices=("on", "off", "both"), default="on")
    ap.add_argument("--doc-chars", type=int, default=0, help="cut documents at this many characters (0: whole files)")
    ap.add_argument(
        "--tokenizer-classes",
        type=int,
        default=0,
        help="grow the tokenizer to this many tokens with added tokens (151665: Qwen2.5's, so that class "
        "selection runs over as many columns as a real Qwen teacher's; 0: the 4,096-token BPE alone)",
    )
    ap.add_argument("--head-chunk-tokens", type=int, default=BuildConfig.head_chunk_tokens)
    args = ap.parse_args(argv)
    doc_attention = {"on": [True], "off": [False], "both": [True, False]}[args.doc_attention]

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    work = Path(tempfile.mkdtemp(prefix="selkd-bench-build-"))
    try:
        texts = stdlib_texts(max_bytes=4_000_000)
        tok = train_bpe_tokenizer(texts[:400], 4096)
        if args.tokenizer_classes > len(tok):  # never in the corpus, but real classes the selection covers
            tok.add_tokens([f"<|extra_{i}|>" for i in range(args.tokenizer_classes - len(tok))])
        model = make_llama(
            args.vocab,
            hidden=args.hidden,
            layers=args.layers,
            heads=max(4, args.hidden // 64),
            seed=0,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.eos_token_id,
        )
        teacher_dir = save_model(model, tok, work / "teacher")
        docs = [p for t in texts for p in chunk_text(t, args.doc_chars)] if args.doc_chars else texts
        write_jsonl(work / "corpus.jsonl", docs)
        n_params = sum(p.numel() for p in model.parameters())
        del model

        tokenizer = load_tokenizer(str(teacher_dir))
        corpus = load_corpus(
            [str(work / "corpus.jsonl")], tokenizer, args.seq_len, limit_tokens=args.tokens, progress=False
        )
        full = np.stack(
            [corpus.sequence(i) for i in range(corpus.n_sequences) if len(corpus.sequence(i)) == args.seq_len]
        )
        docs_per_seq = np.mean([corpus.sequence_doc_start(i)[1:].sum() + 1 for i in range(corpus.n_sequences)])
        dtype = torch.bfloat16 if device.type == "cuda" and args.dtype == "auto" else torch.float32
        teacher = load_causal_lm(str(teacher_dir), device, dtype)
        bare_forward(teacher, full[: args.batch_size], args.batch_size, device)  # warm-up
        rows = []
        for classes, separate in [(c, d) for c in args.classes for d in doc_attention]:
            with PeakRss() as bare_mem:
                bare = bare_forward(teacher, full, args.batch_size, device)
            out = work / f"cache-{classes.replace(':', '-')}"
            with PeakRss() as build_mem:
                res = build_cache(
                    BuildConfig(
                        teacher=str(teacher_dir),
                        data=[str(work / "corpus.jsonl")],
                        out=str(out),
                        classes=classes,
                        max_seq_len=args.seq_len,
                        limit_tokens=args.tokens,
                        eval_fraction=0.0,
                        batch_size=args.batch_size,
                        device=str(device),
                        dtype=args.dtype,
                        doc_attention=separate,
                        head_chunk_tokens=args.head_chunk_tokens,
                        progress=False,
                    )
                )
            positions = res.positions
            # the build also runs the short last sequence; scale the bare time to the same positions
            bare_scaled = bare * positions / (len(full) * (args.seq_len - 1))
            mem = (bare_mem.peak, build_mem.peak)
            rows.append((classes, separate, bare_scaled, res.teacher_seconds, positions, res.bytes_written, mem))
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(
        f"### Build throughput vs bare teacher forward ({n_params / 1e6:.1f}M-parameter Llama, hidden "
        f"{args.hidden}, {args.layers} layers, V = {args.vocab:,} of which {len(tokenizer):,} real classes, batch "
        f"{args.batch_size} x {args.seq_len}, head chunk {args.head_chunk_tokens})\n"
    )
    print(f"machine: {name} ({device.type}, {torch.get_num_threads()} CPU threads); torch {torch.__version__}")
    print(f"command: `python {' '.join(sys.argv)}`; {docs_per_seq:.2f} documents (or pieces) per sequence\n")
    print(
        "| classes | doc attention | bare forward pos/s | build pos/s | build / bare | bytes / position "
        "| peak RSS added: bare / build (MiB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for classes, separate, bare, built, positions, nbytes, (bare_mb, build_mb) in rows:
        print(
            f"| {classes} | {'on' if separate else 'off'} | {positions / bare:,.0f} | {positions / built:,.0f} | "
            f"{bare / built:.2f}x | {nbytes / positions:.1f} | {bare_mb / 2**20:,.0f} / {build_mb / 2**20:,.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

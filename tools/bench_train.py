"""Trainer step time and peak memory (SE-KD 20% vs full KD), loader throughput, offline vs online.

One teacher, one student and one cache per vocabulary; every training run is a separate
`python -m selkd.trainer` process (so peak memory is that run's alone) with the same data, steps
and batch. Step time is the median over the logged steps after the first two (warm-up); peak
memory is CUDA max-allocated on GPU, the process's peak RSS on CPU. Prints markdown tables with
the machine and the command.

    python tools/bench_train.py [--vocabs 32768 151936] [--steps 12] [--batch-size 4] [--seq-len 256]

``--ce-cost R`` measures instead what the CE term on every valid position costs on top of SE-KD 20%
(``--ce-weight 1 --ce-on all``: the LM head and CE a chunk at a time, recomputed in backward), with
full KD for scale: the three runs alternate R times each (A, B, C, A, B, C, ...) so that load on a
shared machine hits them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_tiny import make_llama, save_model, stdlib_texts, train_bpe_tokenizer, write_jsonl

from selkd.cache.build import build_cache
from selkd.cache.config import BuildConfig
from selkd.trainer.cli import main as train_main
from selkd.trainer.data import CacheStream
from selkd.trainer.loader import make_loader


def run_train(args: list[str], nproc: int = 1, in_process: bool = False) -> dict[str, float]:
    """One ``python -m selkd.trainer ARGS`` process (``nproc`` > 1: under ``torchrun --standalone``;
    ``in_process``: ``selkd.trainer.cli.main`` in this process, which saves the start-up on CPU); its
    median step time, peak memory and tokens/s (all ranks) from ``metrics.jsonl``, and its wall time."""
    out = Path(args[args.index("--out") + 1])
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    start = time.perf_counter()
    if in_process:
        if train_main(args) != 0:
            raise RuntimeError("selkd-train failed (its error is above)")
    else:
        proc = subprocess.run([sys.executable, *launch, "-m", "selkd.trainer", *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"selkd-train failed:\n{proc.stderr[-3000:]}")
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if not r.get("eval")]
    times = [r["step_time_s"] for r in train_rows[2:]] or [r["step_time_s"] for r in train_rows]
    return {
        "step_time_s": statistics.median(times),
        "peak_memory_mb": max(r["peak_memory_mb"] for r in train_rows),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train_rows[2:] or train_rows),
        "wall_s": wall,
        "final_loss": train_rows[-1]["loss"],
    }


def loader_tokens_per_s(cache: Path, batch_size: int, batches: int, device: torch.device | None = None) -> float:
    """Tokens/s read from ``cache``: the bare stream in this process, or with ``device`` the trainer's own
    loader (one worker, pinned memory on CUDA) with each batch copied to ``device`` as the loop does."""
    stream = CacheStream(str(cache), batch_size=batch_size, seed=0)
    source = stream if device is None else make_loader(stream, 1, 2, pin_memory=device.type == "cuda")
    start = time.perf_counter()
    tokens = 0
    for i, batch in enumerate(source):
        tokens += batch.num_tokens  # on the host: no device sync
        if device is not None:
            batch.to(device, non_blocking=True)
        if i + 1 >= batches:
            break
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return tokens / (time.perf_counter() - start)


CE_VARIANTS = {
    "SE-KD 20%": ["--select", "student-entropy:0.2"],
    "SE-KD 20% + CE on all": ["--select", "student-entropy:0.2", "--ce-weight", "1", "--ce-on", "all"],
    "full KD": ["--select", "none"],
}


def ce_cost(cache: Path, work: Path, common: list[str], repeats: int) -> dict[str, list[dict[str, float]]]:
    """Each of :data:`CE_VARIANTS` ``repeats`` times, interleaved: {variant: [run_train results]}."""
    out: dict[str, list[dict[str, float]]] = {name: [] for name in CE_VARIANTS}
    for r in range(repeats):
        for i, (name, extra) in enumerate(CE_VARIANTS.items()):
            run_dir = work / f"{r}-{i}"
            out[name].append(run_train(["--cache", str(cache), "--out", str(run_dir), *extra, *common]))
            shutil.rmtree(run_dir)
    return out


def print_ce_cost(args: argparse.Namespace, results: list) -> None:
    """The ``--ce-cost`` table: median over the repeats of each run's median step time, and peak memory."""
    print(
        f"### SE-KD 20% with and without CE on all positions, and full KD (student hidden {args.student_hidden}, "
        f"{args.student_layers} layers; batch {args.batch_size} x {args.seq_len}; {args.steps} steps; "
        f"{args.ce_cost} interleaved runs each)\n"
    )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads; ", end="")
    print(f"torch {torch.__version__}; load average (1, 5, 15 min) at the end: {load}")
    print(f"command: `python {' '.join(sys.argv)}`\n")
    print("| vocab | method | step time (s), per run | median | / SE-KD | peak memory (MB) | / SE-KD |")
    print("|---|---|---|---|---|---|---|")
    for vocab, runs in results:
        base_t = statistics.median(r["step_time_s"] for r in runs["SE-KD 20%"])
        base_m = max(r["peak_memory_mb"] for r in runs["SE-KD 20%"])
        for name, rs in runs.items():
            t = statistics.median(r["step_time_s"] for r in rs)
            m = max(r["peak_memory_mb"] for r in rs)
            each = ", ".join(f"{r['step_time_s']:.3f}" for r in rs)
            print(f"| {vocab:,} | {name} | {each} | {t:.3f} | {t / base_t:.2f}x | {m:,.0f} | {m / base_m:.2f}x |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocabs", type=int, nargs="+", default=[32768, 151936])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--student-hidden", type=int, default=128)
    ap.add_argument("--student-layers", type=int, default=2)
    ap.add_argument("--teacher-hidden", type=int, default=384)
    ap.add_argument("--teacher-layers", type=int, default=4)
    ap.add_argument("--classes", default="sample:50")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--ce-cost", type=int, default=0, metavar="R", help="only SE-KD, SE-KD + CE on all, full KD")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="selkd-bench-train-"))
    tokens = args.batch_size * args.seq_len * (args.steps + 4)
    results = []
    try:
        texts = stdlib_texts(max_bytes=2_000_000)
        tok = train_bpe_tokenizer(texts[:300], 4096)
        write_jsonl(work / "corpus.jsonl", texts)
        for vocab in args.vocabs:
            ids = {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.eos_token_id}
            teacher = save_model(
                make_llama(vocab, hidden=args.teacher_hidden, layers=args.teacher_layers, seed=0, tie=True, **ids),
                tok,
                work / f"teacher-{vocab}",
            )
            student = save_model(
                make_llama(vocab, hidden=args.student_hidden, layers=args.student_layers, seed=1, tie=True, **ids),
                tok,
                work / f"student-{vocab}",
            )
            cache = work / f"cache-{vocab}"
            t0 = time.perf_counter()
            build_cache(
                BuildConfig(
                    teacher=str(teacher),
                    data=[str(work / "corpus.jsonl")],
                    out=str(cache),
                    classes=args.classes,
                    max_seq_len=args.seq_len,
                    limit_tokens=tokens,
                    eval_fraction=0.0,
                    batch_size=args.batch_size,
                    device=args.device,
                    progress=False,
                )
            )
            build_s = time.perf_counter() - t0
            common = [
                "--student",
                str(student),
                "--steps",
                str(args.steps),
                "--batch-size",
                str(args.batch_size),
                "--log-every",
                "1",
                "--eval-every",
                "0",
                "--save-every",
                "0",
                "--progress",
                "false",
                "--num-workers",
                "0",
                "--lr",
                "1e-4",
                "--device",
                args.device,
            ]
            if args.ce_cost:
                results.append((vocab, ce_cost(cache, work / f"ce-{vocab}", common, args.ce_cost)))
                shutil.rmtree(cache)
                continue
            runs = {}
            for name, extra in (("full KD", ["--select", "none"]), ("SE-KD 20%", ["--select", "student-entropy:0.2"])):
                runs[name] = run_train(
                    ["--cache", str(cache), "--out", str(work / f"run-{vocab}-{name[:4]}"), *extra, *common]
                )
            online = run_train(
                [
                    "--teacher",
                    str(teacher),
                    "--data",
                    str(work / "corpus.jsonl"),
                    "--classes",
                    "full",
                    "--max-seq-len",
                    str(args.seq_len),
                    "--limit-tokens",
                    str(tokens),
                    "--eval-fraction",
                    "0",
                    "--out",
                    str(work / f"run-{vocab}-online"),
                    "--select",
                    "none",
                    *common,
                ]
            )
            loader = loader_tokens_per_s(cache, args.batch_size, args.steps)
            results.append((vocab, runs, online, loader, build_s))
            shutil.rmtree(cache)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if args.ce_cost:
        print_ce_cost(args, results)
        return 0
    dev = "cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if dev == "cuda" else (platform.processor() or platform.machine())
    print(
        f"### Trainer: SE-KD 20% vs full KD (student hidden {args.student_hidden}, {args.student_layers} layers, "
        f"tied embeddings; batch {args.batch_size} x {args.seq_len}; {args.steps} steps; cache {args.classes})\n"
    )
    print(f"machine: {name} ({dev}, {torch.get_num_threads()} CPU threads); torch {torch.__version__}")
    print(f"command: `python {' '.join(sys.argv)}`\n")
    print("| vocab | method | step time (s) | SE-KD / full | peak memory (MB) | SE-KD / full | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for vocab, runs, _online, _loader, _build in results:
        full, se = runs["full KD"], runs["SE-KD 20%"]
        for label, r in runs.items():
            rel_t = f"{r['step_time_s'] / full['step_time_s']:.2f}x" if r is se else "1.00x"
            rel_m = f"{r['peak_memory_mb'] / full['peak_memory_mb']:.2f}x" if r is se else "1.00x"
            print(
                f"| {vocab:,} | {label} | {r['step_time_s']:.3f} | {rel_t} | {r['peak_memory_mb']:,.0f} | {rel_m} | "
                f"{r['tokens_per_s']:,.0f} |"
            )
    print("\n### Loader throughput vs training consumption\n")
    print("| vocab | loader tokens/s (1 process, no workers) | SE-KD training tokens/s | ratio |")
    print("|---|---|---|---|")
    for vocab, runs, _online, loader, _build in results:
        se = runs["SE-KD 20%"]["tokens_per_s"]
        print(f"| {vocab:,} | {loader:,.0f} | {se:,.0f} | {loader / se:.1f}x |")
    print("\n### Offline (cache) vs online (teacher in the loop), full KD, same steps\n")
    print("| vocab | offline wall (s) | online wall (s) | offline / online | cache build (s, once) |")
    print("|---|---|---|---|---|")
    for vocab, runs, online, _loader, build_s in results:
        off = runs["full KD"]["wall_s"]
        print(f"| {vocab:,} | {off:.1f} | {online['wall_s']:.1f} | {off / online['wall_s']:.2f}x | {build_s:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

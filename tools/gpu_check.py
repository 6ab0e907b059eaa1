"""One GPU check: the numbers that say whether selkd runs well on a machine's NVIDIA GPUs, in one table.

* **build vs bare forward**: ``selkd-cache build``'s teacher pass (``build_cache``: forward, class
  selection, encoding, writing) of a ~100M-parameter Llama teacher with V = 151,936 (Qwen's padded
  vocabulary, tied embeddings) in bf16, against its bare ``model(input_ids).logits`` over the same
  sequences (``bench_build.bare_forward``);
* **SE-KD 20% vs full KD**: median step time and CUDA peak memory of ``selkd-train`` (one
  ``python -m selkd.trainer`` process each, ``bench_train.run_train``) for a student with V = 151,936;
* **loader vs consumption**: the trainer's loader (one worker, pinned memory, each batch copied to the
  GPU; ``bench_train.loader_tokens_per_s``) against the tokens/s SE-KD training consumes;
* **DDP over NCCL** when 2+ GPUs are present: the same SE-KD run under ``torchrun`` on every GPU
  against the one-GPU run (tokens/s of all ranks; the ideal ratio is the GPU count).

Everything is made here, offline: the stdlib corpus, a BPE tokenizer and random-weight models
(``tools/make_tiny.py``); the package must be installed (``pip install -e .``). It calls the public entry
points (``build_cache``, ``python -m selkd.trainer``), so changes to the build or the trainer show up in its
numbers. On one H200 it takes about 2-4 minutes. ``--device cpu`` runs every check with tiny sizes (the
test suite does, so the script cannot rot; DDP is then left out: it needs 2+ GPUs).

    python tools/gpu_check.py                # CUDA when available
    python tools/gpu_check.py --device cpu   # tiny, end to end
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_build import bare_forward
from bench_train import loader_tokens_per_s, run_train
from make_tiny import make_llama, save_model, stdlib_texts, train_bpe_tokenizer, write_jsonl

from selkd.cache.build import build_cache
from selkd.cache.config import BuildConfig
from selkd.cache.corpus import load_corpus
from selkd.cache.teacher import load_causal_lm, load_tokenizer


@dataclass(frozen=True)
class Sizes:
    """The models and data of one run of the check."""

    vocab: int  # logits of teacher and student (the tokenizer's vocabulary is smaller, as in Qwen)
    tokenizer_vocab: int
    text_bytes: int  # of stdlib source: the corpus
    teacher_hidden: int
    teacher_layers: int
    student_hidden: int
    student_layers: int
    seq_len: int
    batch_size: int
    steps: int  # per training run (the first two are warm-up, left out of the median)
    classes: str  # the cache the trainer reads


SIZES = {
    # teacher: 151,936 x 512 tied embeddings (77.8M) + 4 layers of 4.2M = ~95M parameters; student ~43M
    "cuda": Sizes(151_936, 4096, 6_000_000, 512, 4, 256, 4, 1024, 8, 24, "topk:64"),
    "cpu": Sizes(2048, 320, 150_000, 32, 1, 16, 1, 64, 4, 4, "topk:8"),
}


def machine(device: torch.device) -> str:
    """The machine line: GPU name and count, torch and CUDA versions (or the CPU)."""
    versions = f"torch {torch.__version__}, python {platform.python_version()}"
    if device.type != "cuda":
        return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads); {versions}"
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    return f"{torch.cuda.device_count()} x {', '.join(names)}; {versions}, CUDA {torch.version.cuda}"


def make_inputs(work: Path, sizes: Sizes) -> tuple[Path, Path, Path]:
    """(teacher dir, student dir, corpus file): random-weight Llamas sharing one tokenizer."""
    texts = stdlib_texts(max_bytes=sizes.text_bytes)
    tok = train_bpe_tokenizer(texts[:300], sizes.tokenizer_vocab)
    corpus = work / "corpus.jsonl"
    write_jsonl(corpus, texts)
    ids = {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.eos_token_id}
    shape = {"max_pos": max(1024, sizes.seq_len), "tie": True, **ids}
    teacher = make_llama(sizes.vocab, sizes.teacher_hidden, sizes.teacher_layers, heads=4, seed=0, **shape)
    student = make_llama(sizes.vocab, sizes.student_hidden, sizes.student_layers, heads=4, seed=1, **shape)
    return save_model(teacher, tok, work / "teacher"), save_model(student, tok, work / "student"), corpus


def n_params(model_dir: Path) -> int:
    model = load_causal_lm(str(model_dir), torch.device("cpu"), torch.float32)
    return sum(p.numel() for p in model.parameters())


def check_build(work: Path, teacher: Path, corpus: Path, sizes: Sizes, device: torch.device) -> list[list[str]]:
    """Build the cache the training checks read; its throughput against the bare forward (same batches)."""
    tokens = sizes.batch_size * sizes.seq_len * (sizes.steps + 8)
    tokenizer = load_tokenizer(str(teacher))
    packed = load_corpus([str(corpus)], tokenizer, sizes.seq_len, limit_tokens=tokens, progress=False)
    full = np.stack([s for s in map(packed.sequence, range(packed.n_sequences)) if len(s) == sizes.seq_len])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_causal_lm(str(teacher), device, dtype)
    bare_forward(model, full[: sizes.batch_size], sizes.batch_size, device)  # warm-up
    bare = bare_forward(model, full, sizes.batch_size, device)
    del model
    result = build_cache(
        BuildConfig(teacher=str(teacher), data=[str(corpus)], out=str(work / "cache"), classes=sizes.classes,
                    max_seq_len=sizes.seq_len, limit_tokens=tokens, eval_fraction=0.0, batch_size=sizes.batch_size,
                    device=str(device), progress=False)
    )  # fmt: skip
    bare_rate = len(full) * (sizes.seq_len - 1) / bare
    built_rate = result.positions / result.teacher_seconds
    setting = f"{sizes.classes}, {n_params(teacher) / 1e6:.3g}M-parameter teacher, {str(dtype)[6:]}"
    return [row("build vs bare teacher forward (positions/s)", setting, built_rate, bare_rate, ",.0f")]


def train_args(work: Path, student: Path, sizes: Sizes, device: torch.device, name: str, select: str) -> list[str]:
    flags = {
        "cache": work / "cache", "student": student, "out": work / f"run-{name}", "select": select,
        "steps": sizes.steps, "batch-size": sizes.batch_size, "log-every": 1, "eval-every": 0, "save-every": 0,
        "keep-checkpoints": 0, "progress": "false", "num-workers": 1, "lr": 1e-4, "device": device.type,
    }  # fmt: skip
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))]


def check_training(work: Path, student: Path, sizes: Sizes, device: torch.device) -> list[list[str]]:
    """SE-KD 20% against full KD (step time, peak memory), the loader against SE-KD's consumption, and
    DDP over NCCL on every GPU against one GPU (when there are 2+)."""
    alone = device.type == "cuda"  # a process per run on GPU (its own CUDA peak); in this one on CPU (faster)
    full = run_train(train_args(work, student, sizes, device, "full", "none"), in_process=not alone)
    se = run_train(train_args(work, student, sizes, device, "se", "student-entropy:0.2"), in_process=not alone)
    setting = f"student {n_params(student) / 1e6:.3g}M, V = {sizes.vocab:,}, batch {sizes.batch_size} x {sizes.seq_len}"
    memory = "CUDA peak MB" if device.type == "cuda" else "peak RSS MB"
    loader = loader_tokens_per_s(work / "cache", sizes.batch_size, 4 * sizes.steps, device)
    pinned = "pinned memory" if device.type == "cuda" else "no pinning on CPU"
    rows = [
        row("SE-KD 20% vs full KD: step time (s)", setting, se["step_time_s"], full["step_time_s"], ".4f"),
        row(f"SE-KD 20% vs full KD: {memory}", setting, se["peak_memory_mb"], full["peak_memory_mb"], ",.0f"),
        row("loader vs SE-KD consumption (tokens/s)", f"1 worker, {pinned}", loader, se["tokens_per_s"], ",.0f"),
    ]
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus < 2:
        return [*rows, ["DDP over NCCL", "needs 2+ GPUs", "not run", "", ""]]
    ddp = run_train(train_args(work, student, sizes, device, "ddp", "student-entropy:0.2"), nproc=gpus)
    label = f"DDP over NCCL, {gpus} GPUs vs 1 (tokens/s, all ranks)"
    return [
        *rows,
        row(label, f"SE-KD 20%, batch {sizes.batch_size} per rank", ddp["tokens_per_s"], se["tokens_per_s"], ",.0f"),
    ]


def row(check: str, setting: str, measured: float, against: float, fmt: str) -> list[str]:
    return [check, setting, format(measured, fmt), format(against, fmt), f"{measured / against:.2f}x"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    args = ap.parse_args(argv)
    kind = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    device, sizes = torch.device(kind), SIZES[kind]
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="selkd-gpu-check-"))
    try:
        teacher, student, corpus = make_inputs(work, sizes)
        rows = check_build(work, teacher, corpus, sizes, device) + check_training(work, student, sizes, device)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"### selkd GPU check ({time.perf_counter() - start:.0f} s)\n")
    print(f"machine: {machine(device)}")
    print(f"command: `python {' '.join(sys.argv)}`\n")
    print("| check | setting | measured | against | ratio |")
    print("|---|---|---|---|---|")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

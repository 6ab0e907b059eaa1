"""selkd against the peer a user would pick instead: TRL's GKDTrainer, side by side, in one run.

TRL's ``GKDTrainer`` with ``lmbda=0, beta=0`` is supervised forward KL on the dataset with the teacher
online (no student generations): the same objective as ``selkd-train --teacher ... --classes full
--select none``. Four methods run on the same student, teacher, token sequences, batch and sequence
length, each in a fresh process:

- ``TRL GKD``: ``trl.experimental.gkd.GKDTrainer`` (lmbda=0, beta=0, temperature 1), on the packed
  sequences of the same token store (plain causal attention, as TRL attends across packed documents);
- ``online full KD``: ``selkd-train --teacher --classes full --select none``;
- ``offline KD, all positions`` and ``offline SE-KD 20%``: ``selkd-train --cache`` on an RS-KD
  ``sample:50`` cache built once (its build time is reported apart: it is paid once per corpus).

Every selkd run uses ``--no-doc-attention``, so the attention is TRL's. tokens/s is batch x seq-len over
the median step time (wall time from one step's end to the next, teacher and data included) after two
warm-up steps; peak RSS is the process's own (``VmHWM``). With ``--repeats R`` the methods run R times
interleaved (A, B, C, D, A, B, ...) and the best tokens/s is kept (a busy machine only slows runs
down). Prints a markdown table with the machine and the command.

Pinned peer: trl 1.16.0 (``pip install "selkd[bench]"``).

    python tools/bench_peers.py [--vocabs 32768 151936] [--steps 12] [--batch-size 4] [--seq-len 256] [--repeats 2]
    python tools/bench_peers.py --in-process [...]   # the step alone, both in one process (CPU, busy machine)
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

TRL_VERSION = "1.16.0"
WARMUP = 2
METHODS = ("TRL GKD", "online full KD", "offline KD, all positions", "offline SE-KD 20%")


# runs a child's Python command line (``-m MODULE ARGS`` or ``SCRIPT ARGS``) and, at its exit, copies its
# /proc/self/status to the file named first: VmHWM there is this process's own peak RSS. wait4's ru_maxrss is
# not: Linux carries the parent's peak into a child across fork and exec, so every child would read at least
# the benchmark's own RSS (1.5 GB after it has built a cache at V = 151,936).
_PEAK_WRAPPER = """
import atexit, os, runpy, sys
status, proc = sys.argv.pop(1), "/proc/self/status"
atexit.register(lambda: open(status, "w").write(open(proc).read() if os.path.exists(proc) else ""))
if sys.argv[1] == "-m":
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_process(argv: list[str], log: Path) -> float:
    """Run ``python ARGV`` (output to ``log``); its own peak RSS in MiB (``VmHWM``; ``wait4``'s ru_maxrss,
    which includes the parent's, where there is no /proc)."""
    status = log.with_suffix(".status")
    status.unlink(missing_ok=True)
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-c", _PEAK_WRAPPER, str(status), *argv], stdout=f, stderr=f)
        _, code, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(code)
    if proc.returncode != 0:
        raise RuntimeError(f"python {' '.join(argv[:3])} ... failed:\n{log.read_text()[-3000:]}")
    hwm = [line.split()[1] for line in status.read_text().splitlines() if line.startswith("VmHWM:")]
    return int(hwm[0]) / 1024 if hwm else usage.ru_maxrss / 1024


def tokens_per_s(step_ends: list[float], tokens_per_step: int) -> float:
    """Tokens/s from the wall-clock times at which steps ended (the first WARMUP steps excluded)."""
    gaps = [b - a for a, b in zip(step_ends[WARMUP:], step_ends[WARMUP + 1 :], strict=False)]
    return tokens_per_step / statistics.median(gaps)


def selkd_run(args: list[str], tokens_per_step: int) -> dict[str, float]:
    out = Path(args[args.index("--out") + 1])
    rss = run_process(["-m", "selkd.trainer", *args], out.with_suffix(".log"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ends = [r["elapsed_s"] for r in rows if not r.get("eval")]
    shutil.rmtree(out, ignore_errors=True)
    return {"tokens_per_s": tokens_per_s(ends, tokens_per_step), "peak_rss_mb": rss}


def trl_worker(args: argparse.Namespace) -> None:
    """One TRL GKD run (in its own process); writes the step end times to ``args.result`` as JSON."""
    import numpy as np
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, default_data_collator
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from selkd.cache.tokens import TokenStore

    packed = TokenStore.open(args.tokens).packed(args.seq_len)
    seqs, _ = packed.read(np.arange(packed.n_sequences))
    rows = [s.astype(np.int64).tolist() for s in seqs if len(s) == args.seq_len]
    ds = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * args.seq_len] * len(rows), "labels": rows})
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())

    config = GKDConfig(
        output_dir=args.out,
        lmbda=0.0,
        beta=0.0,
        temperature=1.0,
        max_length=args.seq_len,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=1e-4,
        logging_steps=args.steps,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
        gradient_checkpointing=False,  # TRL's SFT default is True; selkd does not checkpoint the decoder either
        # TRL's default is bf16 autocast, even on a CPU (there 12 steps at V = 151,936 ran 17 minutes unfinished);
        # the models are fp32 and selkd's --dtype auto trains them in fp32: the same precision for both
        bf16=False,
        fp16=False,
    )
    trainer = GKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(args.student),
        teacher_model=AutoModelForCausalLM.from_pretrained(args.teacher),
        args=config,
        data_collator=default_data_collator,
        train_dataset=ds,
        processing_class=AutoTokenizer.from_pretrained(args.teacher),
        callbacks=[Clock()],
    )
    trainer.train()
    Path(args.result).write_text(json.dumps(ends))


def in_process(work: Path, vocab: int, tokens: Path, args: argparse.Namespace) -> dict[str, float]:
    """One training step of TRL GKD's loss (``generalized_jsd_loss``, beta=0, after the student's and the
    teacher's full forward) against selkd's online full-KD step (the live teacher's targets, collate, the
    selective student, backward), AdamW both, in this process, interleaved; best step time of
    ``args.repeats`` after one warm-up. Without process start-up, data loading or logging, on a busy
    machine the ratio is steadier than the per-process runs'. Returns seconds per step by method."""
    import numpy as np
    from transformers import AutoModelForCausalLM
    from trl.experimental.gkd import GKDTrainer

    from selkd.cache.classes import ClassSpec
    from selkd.cache.teacher import load_tokenizer, num_classes
    from selkd.cache.tokens import TokenStore
    from selkd.trainer.batch import collate
    from selkd.trainer.online import OnlineTeacher
    from selkd.trainer.student import Objective, SelectiveStudent

    teacher_dir, student_dir = models(work, vocab, args)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    seqs, docs = TokenStore.open(str(tokens)).packed(args.seq_len).read(np.arange(args.batch_size))
    x = torch.from_numpy(np.stack(seqs).astype(np.int64))
    live = OnlineTeacher(teacher, ClassSpec.parse("full"), 1.0, classes=num_classes(load_tokenizer(str(teacher_dir))))
    live.doc_attention = False  # TRL's attention
    objective = Objective(signal="none", fraction=1.0, policy="none", loss="fkl")

    def trl_loss(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            t = teacher(input_ids=x).logits[:, :-1]
        return GKDTrainer.generalized_jsd_loss(m(input_ids=x).logits[:, :-1], t, labels=x[:, 1:], beta=0.0)

    def selkd_loss(m: torch.nn.Module) -> torch.Tensor:
        batch = collate(live.sequences(seqs, np.arange(len(seqs)), docs), 0)
        out = SelectiveStudent(m, doc_attention=False)(*batch.student_inputs(), objective, doc_start=batch.doc_start)
        return out.loss

    best: dict[str, float] = {}
    runs = {"TRL GKD": trl_loss, "online full KD": selkd_loss}
    students = {name: AutoModelForCausalLM.from_pretrained(student_dir).train() for name in runs}
    optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in students.items()}
    for r in range(args.repeats + 1):  # the first round warms up
        for name, loss_fn in runs.items():
            t0 = time.perf_counter()
            loss_fn(students[name]).backward()
            optims[name].step()
            optims[name].zero_grad()
            if r:
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    return best


def trl_run(work: Path, teacher: Path, student: Path, tokens: Path, args: argparse.Namespace) -> dict[str, float]:
    result = work / "trl-result.json"
    cmd = [__file__, "--worker", "--teacher", str(teacher), "--student", str(student)]
    cmd += ["--tokens", str(tokens), "--out", str(work / "trl-out"), "--result", str(result)]
    cmd += ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    rss = run_process(cmd, work / "trl.log")
    ends = json.loads(result.read_text())
    shutil.rmtree(work / "trl-out", ignore_errors=True)
    return {"tokens_per_s": tokens_per_s(ends, args.batch_size * args.seq_len), "peak_rss_mb": rss}


def selkd_common(student: Path, args: argparse.Namespace) -> list[str]:
    return [
        "--student", str(student), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
        "--log-every", "1", "--eval-every", "0", "--save-every", "0", "--progress", "false",
        "--num-workers", "0", "--lr", "1e-4", "--no-doc-attention",
        "--device", args.device,
    ]  # fmt: skip


def method_commands(work: Path, vocab: int, teacher: Path, student: Path, tokens: Path, cache: Path, args) -> dict:
    """Method name -> a function that runs it once and returns its numbers."""
    common = selkd_common(student, args)
    per_step = args.batch_size * args.seq_len
    online = ["--teacher", str(teacher), "--tokens", str(tokens), "--classes", "full"]
    online += ["--max-seq-len", str(args.seq_len), "--select", "none", "--eval-fraction", "0"]
    return {
        "TRL GKD": lambda: trl_run(work, teacher, student, tokens, args),
        "online full KD": lambda: selkd_run([*online, "--out", str(work / f"on-{vocab}"), *common], per_step),
        "offline KD, all positions": lambda: selkd_run(
            ["--cache", str(cache), "--select", "none", "--out", str(work / f"off-{vocab}"), *common], per_step
        ),
        "offline SE-KD 20%": lambda: selkd_run(
            ["--cache", str(cache), "--select", "student-entropy:0.2", "--out", str(work / f"se-{vocab}"), *common],
            per_step,
        ),
    }


def prepare(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The corpus, the tokenizer and the token store every method reads."""
    from make_tiny import stdlib_texts, train_bpe_tokenizer, write_jsonl

    from selkd.cache.config import PrepareConfig
    from selkd.cache.prepare import prepare_tokens

    texts = stdlib_texts(max_bytes=2_000_000)
    tok = train_bpe_tokenizer(texts[:300], 4096, work / "tokenizer")
    write_jsonl(work / "corpus.jsonl", texts)
    tokens = work / "tokens"
    limit = args.batch_size * args.seq_len * (args.steps + 4)
    cfg = PrepareConfig(
        data=[str(work / "corpus.jsonl")],
        tokenizer=str(work / "tokenizer"),
        out=str(tokens),
        limit_tokens=limit,
        progress=False,
    )
    prepare_tokens(cfg, tok)
    return work / "tokenizer", tokens


def models(work: Path, vocab: int, args: argparse.Namespace) -> tuple[Path, Path]:
    from make_tiny import make_llama, save_model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    ids = {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.eos_token_id}
    shape_t = {"hidden": args.teacher_hidden, "layers": args.teacher_layers}
    shape_s = {"hidden": args.student_hidden, "layers": args.student_layers}
    teacher = save_model(make_llama(vocab, **shape_t, seed=0, tie=True, **ids), tok, work / f"teacher-{vocab}")
    student = save_model(make_llama(vocab, **shape_s, seed=1, tie=True, **ids), tok, work / f"student-{vocab}")
    return teacher, student


def build(work: Path, vocab: int, teacher: Path, tokens: Path, args: argparse.Namespace) -> tuple[Path, float]:
    from selkd.cache.build import build_cache
    from selkd.cache.config import BuildConfig

    cache = work / f"cache-{vocab}"
    t0 = time.perf_counter()
    cfg = BuildConfig(
        teacher=str(teacher),
        tokens=str(tokens),
        out=str(cache),
        classes="sample:50",
        max_seq_len=args.seq_len,
        eval_fraction=0.0,
        batch_size=args.batch_size,
        device=args.device,
        doc_attention=False,
        progress=False,
    )
    build_cache(cfg)
    return cache, time.perf_counter() - t0


def bench_vocab(work: Path, vocab: int, tokens: Path, args: argparse.Namespace) -> tuple[dict, float]:
    """Every method ``args.repeats`` times, interleaved; the best tokens/s of each (and that run's RSS)."""
    teacher, student = models(work, vocab, args)
    cache, build_s = build(work, vocab, teacher, tokens, args)
    runs = method_commands(work, vocab, teacher, student, tokens, cache, args)
    best: dict[str, dict[str, float]] = {}
    for _ in range(args.repeats):
        for name in (m for m in METHODS if m in args.methods or m == "TRL GKD"):
            r = runs[name]()
            print(f"  V={vocab:,} {name}: {r['tokens_per_s']:,.0f} tokens/s, {r['peak_rss_mb']:,.0f} MiB", flush=True)
            if name not in best or r["tokens_per_s"] > best[name]["tokens_per_s"]:
                best[name] = r
    shutil.rmtree(cache, ignore_errors=True)
    return best, build_s


def report(results: list[tuple[int, dict, float]], args: argparse.Namespace, load: str) -> None:
    import trl

    dev = "cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if dev == "cuda" else (platform.processor() or platform.machine())
    print(
        f"\n### selkd vs TRL GKDTrainer (lmbda=0, beta=0): teacher hidden {args.teacher_hidden} x "
        f"{args.teacher_layers} layers, student hidden {args.student_hidden} x {args.student_layers}, tied "
        f"embeddings; batch {args.batch_size} x {args.seq_len}; {args.steps} steps; best of {args.repeats}\n"
    )
    print(f"machine: {name} ({dev}, {os.cpu_count()} CPUs); torch {torch.__version__}; trl {trl.__version__}")
    print(f"load average before / after: {load}")
    print(f"command: `python {' '.join(sys.argv)}`\n")
    print("| vocab | method | tokens/s | vs TRL | peak RSS (MiB) | vs TRL |")
    print("|---|---|---|---|---|---|")
    for vocab, best, build_s in results:
        ref = best["TRL GKD"]
        for method in best:
            r = best[method]
            print(
                f"| {vocab:,} | {method} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x "
                f"| {r['peak_rss_mb']:,.0f} | {r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x |"
            )
        print(f"| {vocab:,} | (sample:50 cache build, once) | {build_s:.1f} s | | | |")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocabs", type=int, nargs="+", default=[32768, 151936])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--student-hidden", type=int, default=128)
    ap.add_argument("--student-layers", type=int, default=2)
    ap.add_argument("--teacher-hidden", type=int, default=384)
    ap.add_argument("--teacher-layers", type=int, default=4)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help="a subset of the methods (TRL always runs)")
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="instead: one step of TRL's loss against selkd's online full-KD step in this process, interleaved "
        "(prints vocab | method | step s | tokens/s | vs TRL)",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one TRL run (internal)
    for internal in ("--teacher", "--student", "--tokens", "--out", "--result"):
        ap.add_argument(internal, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        trl_worker(args)
        return 0
    import trl

    if trl.__version__ != TRL_VERSION:
        print(f"note: trl {trl.__version__} installed; these numbers were taken with {TRL_VERSION}", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="selkd-bench-peers-"))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        _, tokens = prepare(work, args)
        if args.in_process:
            for vocab in args.vocabs:
                best = in_process(work, vocab, tokens, args)
                ref, per_step = best["TRL GKD"], args.batch_size * args.seq_len
                for name, sec in best.items():
                    print(f"| {vocab:,} | {name} | {sec:.2f} | {per_step / sec:,.0f} | {ref / sec:.2f}x |", flush=True)
            return 0
        results = [(vocab, *bench_vocab(work, vocab, tokens, args)) for vocab in args.vocabs]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results, args, load + " / " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

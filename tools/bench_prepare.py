"""The corpus stage at scale: peak memory and throughput of `selkd-cache prepare`.

The corpus is made from files every machine has: the ``.py``, ``.pyi``, ``.txt`` and ``.md`` files of
the running interpreter's standard library and of this environment's site-packages, sorted by path,
cut at line ends into ``{"text": ...}`` rows of at most ``--max-doc-chars`` characters (peak memory
grows with the longest document, not with the corpus: the cap keeps the small and the large corpus
alike in that), written to ``--files`` jsonl files (one input unit each). The
tokenizer is a byte-level BPE trained here on the rows of the first 4 corpus files
(``tools/make_tiny.py``, ``--vocab`` tokens). Each measurement runs ``selkd-cache prepare
--limit-tokens N --workers W`` in a fresh process and reports its wall time, tokens/s and peak RSS
(Linux ``VmHWM`` of the main process, ``ru_maxrss`` of its largest worker). Then it checks that the
store of 2 workers equals that of 1 (same content hash) and that a cache built from a token store by
2 builder ranks equals a 1-rank build (commit-record checksums of every array), with a tiny random
teacher over ``--build-tokens`` tokens.

    python tools/bench_prepare.py [--sizes 5000000 50000000] [--workers 1 2] [--pin] [--work DIR] [--keep]

With ``--pin`` a run of W workers may use only the first W cores (``sched_setaffinity``), so that
"1 process" means one core's work and the rows measure how processes scale; without it every run
may use every core (one worker's tokenizer then runs a thread per core, W workers a share each).

Goals (issue 11): peak RSS at 50M <= 1.25x peak RSS at 5M; 2 workers <= 0.65x the wall time of 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import faults
from make_tiny import chunk_text, make_llama, save_model, train_bpe_tokenizer

SUFFIXES = (".py", ".pyi", ".txt", ".md")


def text_files() -> list[Path]:
    """Every text file of the corpus, in a fixed order: the stdlib first, then site-packages."""
    found: list[Path] = []
    for key in ("stdlib", "purelib"):
        root = Path(sysconfig.get_paths()[key])
        here = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "site-packages" or key == "purelib")
            here += [Path(dirpath) / f for f in filenames if f.endswith(SUFFIXES)]
        found += sorted(here, key=lambda p: p.relative_to(root).as_posix())
    return found


def write_corpus(out: Path, n_files: int, max_chars: int, max_doc_chars: int) -> int:
    """Up to ``max_chars`` characters of text files as jsonl rows of at most ``max_doc_chars`` characters
    (longer lines stay whole), dealt in order into ``n_files`` files of about equal size; returns the
    characters written."""
    out.mkdir(parents=True, exist_ok=True)
    per_file = max_chars // n_files
    written, index, in_file = 0, 0, 0
    fh = (out / f"part-{index:04d}.jsonl").open("w", encoding="utf-8")
    for path in text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not text.strip():
            continue
        for piece in chunk_text(text, max_doc_chars):
            fh.write(json.dumps({"text": piece}, ensure_ascii=False) + "\n")
        written += len(text)
        in_file += len(text)
        if written >= max_chars:
            break
        if in_file >= per_file and index + 1 < n_files:
            fh.close()
            index, in_file = index + 1, 0
            fh = (out / f"part-{index:04d}.jsonl").open("w", encoding="utf-8")
    fh.close()
    return written


def measure_one(argv: list[str]) -> None:
    """The ``_measure`` mode: run `selkd-cache ARGV` in this process and print its time and peak RSS
    (``_measure --cores N ARGV``: on the first N cores only)."""
    if argv[:1] == ["--cores"]:
        os.sched_setaffinity(0, range(int(argv[1])))
        argv = argv[2:]
    from selkd.cache.cli import main

    start = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - start
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    print(json.dumps({"code": code, "seconds": seconds, "main_kib": int(hwm.split()[1]), "worker_kib": children}))


def prepare(work: Path, tokenizer: Path, tokens: int, workers: int, out: Path, pin: bool = False) -> dict[str, Any]:
    """One measured `selkd-cache prepare` in a fresh process (on ``workers`` cores if ``pin``)."""
    argv = ["prepare", "--data", str(work / "corpus"), "--tokenizer", str(tokenizer), "--out", str(out),
            "--limit-tokens", str(tokens), "--workers", str(workers), "--no-progress"]  # fmt: skip
    start = time.perf_counter()
    cores = ["--cores", str(workers)] if pin else []
    proc = subprocess.run([sys.executable, __file__, "_measure", *cores, *argv], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    summary = json.loads((out / "selkd" / "summary.json").read_text())
    return {
        "tokens": summary["n_tokens"],
        "workers": workers,
        "wall_s": wall,
        "prepare_s": row["seconds"],
        "tokens_per_s": summary["n_tokens"] / row["seconds"],
        "main_mib": row["main_kib"] / 1024,
        "worker_mib": row["worker_kib"] / 1024,
        "peak_mib": max(row["main_kib"], row["worker_kib"]) / 1024,
        "content": summary["content_sha256"],
    }


def build_check(work: Path, teacher: Path, tokens: Path) -> bool:
    """A cache built from ``tokens`` by 2 concurrent builder ranks equals a 1-rank build."""
    common = ["build", "--teacher", str(teacher), "--tokens", str(tokens), "--classes", "topk:4", "--max-seq-len",
              "512", "--batch-size", "16", "--device", "cpu", "--no-progress"]  # fmt: skip
    cmd = [sys.executable, "-m", "selkd.cache"]
    subprocess.run([*cmd, *common, "--out", str(work / "cache-1")], check=True, capture_output=True)
    two = [*cmd, *common, "--out", str(work / "cache-2"), "--world-size", "2", "--rank"]
    ranks = [subprocess.Popen([*two, str(r)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for r in (0, 1)]
    for p in ranks:
        if p.wait() != 0:
            raise SystemExit(f"build rank failed:\n{p.stderr.read().decode()[-3000:]}")  # type: ignore[union-attr]
    one, two = faults.cache_digest(work / "cache-1"), faults.cache_digest(work / "cache-2")
    return bool(one) and one == two


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| tokens | workers | wall (s) | prepare (s) | tokens/s | peak RSS main (MiB) | peak RSS worker (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        worker = f"{r['worker_mib']:,.0f}" if r["workers"] > 1 else "-"
        lines.append(
            f"| {r['tokens']:,} | {r['workers']} | {r['wall_s']:.1f} | {r['prepare_s']:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {r['main_mib']:,.0f} | {worker} |"
        )
    return "\n".join(lines)


def verdicts(rows: list[dict[str, Any]], sizes: list[int]) -> list[str]:
    """The two goals, per worker count and size pair, as measured."""
    out = []
    by = {(r["tokens"], r["workers"]): r for r in rows}
    small, large = min(sizes), max(sizes)
    for w in sorted({r["workers"] for r in rows}):
        if (small, w) in by and (large, w) in by:
            ratio = by[(large, w)]["peak_mib"] / by[(small, w)]["peak_mib"]
            out.append(f"peak RSS {large:,} / {small:,} tokens, {w} worker(s): {ratio:.2f}x (goal <= 1.25x)")
    for n in sizes:
        if (n, 1) in by and (n, 2) in by:
            ratio = by[(n, 2)]["prepare_s"] / by[(n, 1)]["prepare_s"]
            out.append(f"time 2 workers / 1 worker at {n:,} tokens: {ratio:.2f}x (goal <= 0.65x)")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_measure"]:
        measure_one(argv[1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[5_000_000, 50_000_000], help="tokens per measurement")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="--workers values to measure")
    ap.add_argument("--files", type=int, default=128, help="jsonl files (input units) of the corpus")
    ap.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary of the tokenizer")
    ap.add_argument("--max-doc-chars", type=int, default=200_000, help="longest document (row) of the corpus")
    ap.add_argument("--build-tokens", type=int, default=300_000, help="tokens of the build check (0: skip it)")
    ap.add_argument("--work", type=Path, help="work directory (default: a temporary one, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--pin", action="store_true", help="run W workers on the first W cores only")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="selkd-bench-prepare-"))
    try:
        return run(args, work)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    corpus = work / "corpus"
    if not corpus.is_dir():
        chars = write_corpus(corpus, args.files, int(max(args.sizes) * 4.5), args.max_doc_chars)
        print(f"corpus: {chars:,} characters in {args.files} files under {corpus}", file=sys.stderr)
    tok_dir = work / "tokenizer"
    if not tok_dir.is_dir():
        sample = []
        for f in sorted(corpus.iterdir())[:4]:
            sample += [json.loads(line)["text"] for line in f.read_text().splitlines()]
        train_bpe_tokenizer(sample[:2000], args.vocab, out_dir=tok_dir)
    rows = []
    for size in args.sizes:
        for workers in args.workers:
            out = work / f"tokens-{size}-{workers}"
            shutil.rmtree(out, ignore_errors=True)
            rows.append(prepare(work, tok_dir, size, workers, out, args.pin))
            print(json.dumps(rows[-1]), file=sys.stderr)
    same = {r["tokens"]: r["content"] for r in rows if r["workers"] == args.workers[0]}
    stores_equal = all(r["content"] == same[r["tokens"]] for r in rows)
    lines = [table(rows), "", *verdicts(rows, args.sizes)]
    lines.append(f"stores of {' and '.join(map(str, args.workers))} workers equal (content hash): {stores_equal}")
    if args.build_tokens:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        model = make_llama(len(tokenizer), hidden=32, layers=1, seed=0, eos_token_id=tokenizer.eos_token_id)
        teacher = save_model(model, tokenizer, work / "teacher")
        store = work / "tokens-build"
        shutil.rmtree(store, ignore_errors=True)
        prepare(work, tok_dir, args.build_tokens, 2, store)
        for name in ("cache-1", "cache-2"):
            shutil.rmtree(work / name, ignore_errors=True)
        equal = build_check(work, teacher, store)
        lines.append(f"build of {args.build_tokens:,} tokens from a 2-worker store, 2 ranks == 1 rank: {equal}")
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    lines.append(f"machine: {machine}; tokenizer: byte-level BPE, {args.vocab} tokens, trained on this corpus")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

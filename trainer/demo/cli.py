"""``selkd-demo``: the command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from selkd.cache.errors import Command, run_cli
from selkd.cache.options import add_version

INTERRUPTED = "interrupted; rerun the same command to continue (finished stages are reused)"
DISK_FULL_RERUN = "finished stages are reused"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="selkd-demo",
        description="Train a tokenizer, a teacher and a base student on a corpus (the Python standard library by "
        "default), build caches, distil with CE only / full KD (online, cached) / SE-KD / SE-KD 3X, and write a "
        "table with a plain reading of it and a report with plots. Later runs reuse every stage whose inputs are "
        "unchanged.",
    )
    add_version(p)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smaller teacher and budgets, the same stages, table and plots: about 3 minutes on 2 quiet CPU cores from "
        "an empty cache (under 4); the full demo takes under 15 the first time",
    )
    p.add_argument(
        "--data",
        nargs="+",
        metavar="SPEC",
        help="your own corpus instead of the standard library: .txt/.jsonl/.jsonl.gz/.parquet files, directories, "
        "globs or a `datasets` save_to_disk directory (plain text rows)",
    )
    p.add_argument(
        "--text-field", default="text", help="field of .jsonl/.parquet rows that holds the text (default: text)"
    )
    p.add_argument(
        "--out",
        default="selkd-demo",
        metavar="DIR",
        help="where the corpus files, caches, training runs, report.md and plots go (default: ./selkd-demo)",
    )
    p.add_argument(
        "--models",
        metavar="DIR",
        help="where the tokenizer, teacher and base student are kept for reuse, under demo-<hash>/ "
        "(default: $XDG_CACHE_HOME/selkd or ~/.cache/selkd)",
    )
    p.add_argument(
        "--budget-scale",
        type=float,
        default=1.0,
        metavar="X",
        help="multiply every time, step and data budget by X (e.g. 0.05 for a smoke test; results then mean "
        "little) (default: 1)",
    )
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch CPU threads (default: the cores other processes leave idle when the demo starts, minus one, "
        "at least 1: on 2 cores, 1 thread; more threads win little for these tiny models and lose a lot when "
        "another job starts)",
    )
    p.add_argument(
        "--rerun",
        action="store_true",
        help="retrain the compared students even where an earlier run had identical inputs (the tokenizer, "
        "teacher, base student and caches are still reused)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    if not args.budget_scale > 0:
        print("selkd-demo: error: --budget-scale must be > 0", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print("selkd-demo: error: --threads must be >= 1", file=sys.stderr)
        return 2

    def run() -> int:
        from selkd.trainer.demo.run import run_demo  # torch and transformers: after the arguments are checked

        run_demo(
            quick=args.quick,
            data=args.data,
            text_field=args.text_field,
            out=args.out,
            models=args.models,
            budget_scale=args.budget_scale,
            threads=args.threads,
            rerun=args.rerun,
        )
        return 0

    logs = Path(args.out) / "logs"
    cmd = Command("selkd-demo", INTERRUPTED, DISK_FULL_RERUN, out=args.out, note=f" (stage logs: {logs})")
    return run_cli(cmd, run)


if __name__ == "__main__":
    sys.exit(main())

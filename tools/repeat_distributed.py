"""Run the multi-process (torchrun, gloo) tests N times in a row and count the runs that fail.

A failure that shows up once in a while (a rank aborting at exit, a hang) hides from a single run; this
runs the same tests again and again, each time in a fresh pytest process, and tells aborts apart from
other failures. ``--load K`` keeps K extra processes spinning on the CPU meanwhile, as a full-suite run
or a busy machine would. Logs of failed runs are kept in ``--logs``.

    python tools/repeat_distributed.py -n 20                       # this interpreter's torch
    python tools/repeat_distributed.py -n 20 --python .venv214/bin/python --load 1

Exit status: 0 when every run passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Every test that starts torchrun with two ranks.
TESTS = [
    "tests/test_checkpoint.py::test_ddp_and_fsdp2_two_processes",
    "tests/test_train_distributed.py",
    "tests/test_build_distributed.py::test_torchrun_two_processes_equal_one",
]
# What a rank that aborts leaves in torchrun's report (SIGABRT is signal 6).
ABORT = re.compile(r"terminate called|Signal 6 \(SIGABRT\)|exitcode\s*:\s*-6|SIGABRT")


def _spin() -> None:
    while True:
        pass


def run_once(python: str, tests: list[str], log: Path, timeout_s: float) -> tuple[str, float]:
    """One pytest process over ``tests``: "pass", "abort", "fail" or "timeout", and its seconds."""
    cmd = [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        log.write_text(f"{err}\n{err.stdout or ''}{err.stderr or ''}")
        return "timeout", time.monotonic() - start
    elapsed = time.monotonic() - start
    if proc.returncode == 0:
        return "pass", elapsed
    output = proc.stdout + proc.stderr
    log.write_text(output)
    return ("abort" if ABORT.search(output) else "fail"), elapsed


def torch_version(python: str) -> str:
    out = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--runs", type=int, default=20)
    ap.add_argument("--python", default=sys.executable, help="interpreter whose torch and selkd are tested")
    ap.add_argument("--load", type=int, default=0, help="extra busy processes during the runs")
    ap.add_argument("--logs", type=Path, default=None, help="where logs of failed runs go (default: a temp dir)")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds one run may take")
    ap.add_argument("tests", nargs="*", default=TESTS, help="pytest node ids (default: every torchrun test)")
    args = ap.parse_args(argv)
    logs = args.logs or Path(tempfile.mkdtemp(prefix="selkd-repeat-"))
    logs.mkdir(parents=True, exist_ok=True)

    print(
        f"torch {torch_version(args.python)} ({args.python}), {platform.node()}: {multiprocessing.cpu_count()} "
        f"CPUs, {args.load} busy processes; {args.runs} runs of: {' '.join(args.tests)}",
        flush=True,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` stops the spinners and the pytest run too
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.load)]
    for p in spinners:
        p.start()
    counts: dict[str, int] = {}
    total = time.monotonic()
    try:
        for i in range(1, args.runs + 1):
            log = logs / f"run-{i:03d}.log"
            outcome, seconds = run_once(args.python, args.tests, log, args.timeout)
            counts[outcome] = counts.get(outcome, 0) + 1
            kept = "" if outcome == "pass" else f" (log: {log})"
            print(f"run {i}/{args.runs}: {outcome} in {seconds:.0f} s{kept}", flush=True)
    finally:
        for p in spinners:
            p.terminate()
            p.join()
    failed = args.runs - counts.get("pass", 0)
    detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"{failed} of {args.runs} runs failed ({detail}) in {time.monotonic() - total:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

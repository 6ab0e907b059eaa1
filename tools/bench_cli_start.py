#!/usr/bin/env python
"""Start-up time of the selkd command lines: what a user waits for before anything happens.

Each case runs in a fresh interpreter (``python -c "main([...])"`` through the same ``main`` the
console scripts call) ``--runs`` times, alternating the cases so a burst of load on a shared machine
spreads over all of them; the median wall time is reported. The cases: ``selkd-cache --help``,
``selkd-train --help``, ``selkd-cache info CACHE``, ``selkd-cache verify CACHE`` and a usage error (a
mistyped flag). Without ``--cache`` a tiny cache is built first (``tools/make_tiny.py`` models, a few
thousand tokens), which is what ``info`` and ``verify`` read: their time is start-up, not reading.

    python tools/bench_cli_start.py [--runs 7] [--cache STORE]

Prints a markdown table with the machine, Python and torch version, and for each case whether torch
and transformers were imported.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

# One line of Python per case; it prints the heavy modules that were imported (the last line of stdout).
_PROBE = (
    "import sys\n"
    "from {module} import main\n"
    "try:\n"
    "    main({argv!r})\n"
    "except SystemExit:\n"
    "    pass\n"
    "print(' '.join(m for m in ('torch', 'transformers') if m in sys.modules) or '-')\n"
)


def cases(cache: str) -> dict[str, tuple[str, list[str]]]:
    return {
        "selkd-cache --help": ("selkd.cache.cli", ["--help"]),
        "selkd-train --help": ("selkd.trainer.cli", ["--help"]),
        "selkd-cache info CACHE": ("selkd.cache.cli", ["info", cache]),
        "selkd-cache verify CACHE": ("selkd.cache.cli", ["verify", cache]),
        "selkd-train --stpes 3 (usage error)": ("selkd.trainer.cli", ["--stpes", "3"]),
    }


def run_once(module: str, argv: list[str]) -> tuple[float, str]:
    """Wall seconds of one fresh interpreter running ``module.main(argv)``, and the heavy modules it imported."""
    code = _PROBE.format(module=module, argv=argv)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    lines = done.stdout.strip().splitlines()
    return elapsed, (lines[-1] if lines else "?")


def tiny_cache(work: Path) -> str:
    """A cache of a few thousand tokens from a tiny random teacher (built once, not timed)."""
    tools = Path(__file__).resolve().parent
    subprocess.run([sys.executable, str(tools / "make_tiny.py"), "--out", str(work / "tiny")], check=True)
    out = work / "cache"
    build = [
        *("build", "--teacher", str(work / "tiny" / "teacher"), "--data", str(work / "tiny" / "corpus.jsonl")),
        *("--out", str(out), "--limit-tokens", "4000", "--max-seq-len", "64", "--part-tokens", "1024"),
        *("--device", "cpu", "--no-progress"),
    ]
    subprocess.run([sys.executable, "-m", "selkd.cache", *build], check=True)
    return str(out)


def bench(cache: str, runs: int) -> dict[str, tuple[list[float], str]]:
    table = cases(cache)
    times: dict[str, list[float]] = {name: [] for name in table}
    imported: dict[str, str] = {}
    run_once(*table["selkd-cache --help"])  # warm the page cache: the first start reads every .py/.so from disk
    for _ in range(runs):
        for name, (module, argv) in table.items():
            seconds, heavy = run_once(module, argv)
            times[name].append(seconds)
            imported[name] = heavy
    return {name: (times[name], imported[name]) for name in table}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=7, help="runs per case; the median is reported (default: 7)")
    p.add_argument("--cache", help="the cache info/verify read (default: build a tiny one in a temporary directory)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or tiny_cache(Path(tmp))
        results = bench(cache, args.runs)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f}; "
        f"Python {platform.python_version()}, torch {version('torch')}, transformers {version('transformers')}"
    )
    print(f"command: python tools/bench_cli_start.py --runs {args.runs}\n")
    print("| command | median s | min s | max s | imports torch / transformers |")
    print("|---|---:|---:|---:|---|")
    for name, (times, heavy) in results.items():
        print(f"| `{name}` | {statistics.median(times):.2f} | {min(times):.2f} | {max(times):.2f} | {heavy} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Start-up time of the selkd command lines: what a user waits for before anything happens.

Each case runs in a fresh interpreter (``python -c "main([...])"`` through the same ``main`` the
console scripts call) ``--runs`` times, alternating the cases so a burst of load on a shared machine
spreads over all of them; the median wall time is reported, and the median CPU time (user + system
of the child process), which a busy machine inflates much less than the wall time. The cases: ``selkd-cache --help``,
``selkd-train --help``, ``selkd-cache info CACHE``, ``selkd-cache verify CACHE`` and a usage error (a
mistyped flag). Without ``--cache`` a tiny cache is built first (``tools/make_tiny.py`` models, a few
thousand tokens), which is what ``info`` and ``verify`` read: their time is start-up, not reading.

    python tools/bench_cli_start.py [--runs 7] [--cache STORE] [--before REV]

``--before REV`` also times the code of git revision REV (its ``cache/`` and ``trainer/``, exported to
a temporary directory that ``PYTHONPATH`` puts ahead of this checkout's editable install), each of its
runs right after the same case on this checkout, so both see the same load on a shared machine.

Prints a markdown table with the machine, Python and torch version, and for each case whether torch
and transformers were imported.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
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


def run_once(module: str, argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Wall and CPU seconds of one fresh interpreter running ``module.main(argv)``, and the heavy
    modules it imported."""
    code = _PROBE.format(module=module, argv=argv)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = done.stdout.strip().splitlines()
    return elapsed, cpu, (lines[-1] if lines else "?")


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


def export_revision(rev: str, work: Path) -> dict[str, str]:
    """The environment that runs revision ``rev``'s selkd: its packages under ``work/selkd/``, first on the path."""
    root = Path(__file__).resolve().parent.parent
    (work / "selkd").mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", rev, "cache", "trainer"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(work / "selkd")], input=archive.stdout, check=True)
    return {**os.environ, "PYTHONPATH": str(work)}


def bench(
    cache: str, runs: int, versions: dict[str, dict[str, str] | None]
) -> dict[tuple[str, str], tuple[list[tuple[float, float]], str]]:
    """(case, version) -> ((wall, CPU) seconds of each run, the heavy modules imported)."""
    table = cases(cache)
    times: dict[tuple[str, str], list[tuple[float, float]]] = {(n, v): [] for n in table for v in versions}
    imported: dict[tuple[str, str], str] = {}
    for env in versions.values():  # warm the page cache: the first start reads every .py/.so from disk
        run_once(*table["selkd-cache --help"], env=env)
    for _ in range(runs):
        for name, (module, argv) in table.items():
            for label, env in versions.items():
                wall, cpu, heavy = run_once(module, argv, env)
                times[name, label].append((wall, cpu))
                imported[name, label] = heavy
    return {key: (times[key], imported[key]) for key in times}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=7, help="runs per case; the median is reported (default: 7)")
    p.add_argument("--cache", help="the cache info/verify read (default: build a tiny one in a temporary directory)")
    p.add_argument("--before", metavar="REV", help="also time this git revision's code, alternating with this checkout")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or tiny_cache(Path(tmp))
        versions: dict[str, dict[str, str] | None] = {"this checkout": None}
        if args.before:
            versions = {args.before: export_revision(args.before, Path(tmp) / "before"), **versions}
        results = bench(cache, args.runs, versions)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f}; "
        f"Python {platform.python_version()}, torch {version('torch')}, transformers {version('transformers')}"
    )
    print(f"command: python tools/bench_cli_start.py {' '.join(sys.argv[1:])}\n")
    print("| command | code | wall median s | wall min s | wall max s | CPU median s | imports torch / transformers |")
    print("|---|---|---:|---:|---:|---:|---|")
    for (name, label), (times, heavy) in results.items():
        wall = [w for w, _ in times]
        cpu = statistics.median(c for _, c in times)
        row = f"{statistics.median(wall):.2f} | {min(wall):.2f} | {max(wall):.2f} | {cpu:.2f}"
        print(f"| `{name}` | {label} | {row} | {heavy} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

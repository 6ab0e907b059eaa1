"""The machine the demo runs on: usable and busy cores, torch threads, peak memory, a description."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def busy_cores(samples: int = 10, interval_s: float = 0.05) -> float | None:
    """How many other processes are running right now: the mean of ``/proc/loadavg``'s runnable count
    (minus this process) over half a second. The 1-minute load average would lag by a minute and count
    what this process itself just did (a second run right after a first would see a busy machine)."""
    counts = []
    for i in range(samples):
        try:
            running = Path("/proc/loadavg").read_text().split()[3].split("/")[0]
        except (OSError, IndexError):
            return None
        counts.append(int(running) - 1)
        if i + 1 < samples:
            time.sleep(interval_s)
    return sum(counts) / len(counts)


def default_threads() -> int:
    """Torch threads: the cores other processes leave idle when the demo starts, minus one, at least 1.

    Why not all cores: on a shared machine, OpenMP threads wait for each other at every barrier while the
    scheduler runs someone else. Measured on 2 shared cores: 2 threads on an idle machine were 1.6-1.8x
    faster than 1 for these models, but when a neighbour's job started mid-run a 40-step KD run took
    149 s instead of 17 s. One core is left free because the demo cannot know who starts next."""
    cores = usable_cores()
    busy = busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            busy = 0.0
    return max(1, min(cores - 1, math.floor(cores - busy + 0.5)))


def reset_peak_memory() -> bool:
    """Reset this process's peak RSS (Linux ``clear_refs``), so the next reading is the peak of one
    stage, not of the whole demo; False where that is not possible (the reading is then cumulative).
    Freed heap memory is handed back to the OS first (``malloc_trim``), so what earlier stages freed
    does not count towards the next one."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_mb() -> float:
    """Peak RSS of this process since the last reset (the trainer's own CPU measure)."""
    from selkd.trainer.loop import memory_mb

    return float(memory_mb(torch.device("cpu")))


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = usable_cores()
    load = None
    with contextlib.suppress(OSError, AttributeError):
        load = round(os.getloadavg()[0], 2)
    import transformers

    return {
        "cpu": cpu or "unknown",
        "cores": cores,
        "torch_threads": threads,
        "load_average_1min": load,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }

"""Read speed of the trainer's unit reads: cache format version 2 (a crc32c per inner chunk) against 1.

Writes a cache of synthetic teacher outputs (``bench_storage.synthetic_logits``: V = 151,936, mean
entropy 2.8 nats, through ``teacher_outputs`` -> ``PartWriter``, parts of ``--part-sequences``), and a
copy rewritten as format version 1 wrote it (``bench_storage.drop_chunk_checksums``). Then times
``CacheReader.read_range`` over every unit of ``--unit-size`` consecutive sequences, the way
``trainer/data.py`` reads them (each part's arrays opened once), alternating the two caches
``--repeats`` times; the files are in the page cache, so this is the CPU cost of reading (decoding,
and for version 2 the checksums), not disk speed. Both the wall time and the process's CPU time (all
threads: zarr decodes on its own) are taken; on a shared machine the CPU time is the steadier one.
Prints a markdown table with machine and command.

    python tools/bench_read.py [--sequences 512] [--modes sample:50 topk:64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import google_crc32c
import numpy as np
import torch
from bench_storage import drop_chunk_checksums, synthetic_logits

from selkd.cache import format as fmt
from selkd.cache.classes import ClassSpec, TeacherOutputs, teacher_outputs
from selkd.cache.reader import open_cache
from selkd.cache.store import Storage
from selkd.cache.writer import PartWriter


def write_cache(
    root: Path, mode: str, outputs: list[TeacherOutputs], vocab: int, seq_len: int, n_seq: int, per_part: int
) -> None:
    """A cache of ``n_seq`` sequences of random tokens whose targets cycle through ``outputs``."""
    spec = ClassSpec.parse(mode)
    storage = Storage.open(str(root), mode="w")
    header = {
        "format": fmt.FORMAT_NAME,
        "format_version": fmt.FORMAT_VERSION,
        "classes": {"mode": spec.mode, "k": spec.k, "text": mode},
        "vocab_size": vocab,
        "max_seq_len": seq_len,
        "temperature": 1.0,
        "tokenizer_fingerprint": "synthetic",
    }
    storage.write_json("zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": {fmt.ROOT_ATTR: header}})
    tokens = np.random.default_rng(0).integers(0, vocab, (n_seq, seq_len), dtype=np.int32)
    doc_start = np.zeros(seq_len, dtype=bool)
    for p, first in enumerate(range(0, n_seq, per_part)):
        writer = PartWriter(storage, fmt.part_name(p), "train", spec.mode, spec.k, vocab)
        for i in range(first, min(n_seq, first + per_part)):
            writer.add(np.array([i]), [tokens[i]], [doc_start], outputs[i % len(outputs)])
        writer.commit()


def read_units(url: str, unit_size: int) -> tuple[float, float, int, int]:
    """One pass of unit reads over the cache: (wall seconds, CPU seconds, sequences, decoded bytes)."""
    reader = open_cache(url, require_complete=False)
    start, cpu = time.perf_counter(), time.process_time()
    sequences = nbytes = 0
    for part in reader.split_parts("train"):
        arrays = reader.open_part(part)
        for lo in range(0, part.n_sequences, unit_size):
            data = reader.read_range(part, lo, min(lo + unit_size, part.n_sequences), arrays)
            sequences += len(data)
            nbytes += sum(a.nbytes for a in data.arrays.values())
    return time.perf_counter() - start, time.process_time() - cpu, sequences, nbytes


def crc_speed(root: Path) -> float:
    """GB/s of crc32c (zarr's implementation, ``google_crc32c``) over every stored file of a cache: what
    the check itself costs, without zarr's per-codec overhead."""
    blobs = [p.read_bytes() for p in root.rglob("*") if p.is_file()]
    start = time.perf_counter()
    for blob in blobs:
        google_crc32c.value(blob)
    return sum(len(b) for b in blobs) / (time.perf_counter() - start) / 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--sequences", type=int, default=512, help="sequences in the cache")
    ap.add_argument("--part-sequences", type=int, default=2048, help="sequences per part (the builder's 1M tokens)")
    ap.add_argument("--distinct", type=int, default=8, help="distinct sequences of synthetic targets (cycled)")
    ap.add_argument("--unit-size", type=int, default=32, help="sequences per read (CacheStream's unit_size)")
    ap.add_argument("--modes", nargs="+", default=["sample:50", "topk:64"])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    positions = args.seq_len - 1
    logits = synthetic_logits(args.vocab, args.distinct * positions, 2.8, False, seed=0)
    root = Path(tempfile.mkdtemp(prefix="selkd-bench-read-"))
    rows = []
    try:
        for mode in args.modes:
            g = torch.Generator().manual_seed(0)
            nxt = torch.randint(0, args.vocab, (positions,), generator=g)
            outputs = [
                teacher_outputs(logits[d * positions : (d + 1) * positions], nxt, ClassSpec.parse(mode), generator=g)
                for d in range(args.distinct)
            ]
            v2, v1 = root / f"{mode.replace(':', '-')}-v2", root / f"{mode.replace(':', '-')}-v1"
            write_cache(v2, mode, outputs, args.vocab, args.seq_len, args.sequences, args.part_sequences)
            shutil.copytree(v2, v1)
            drop_chunk_checksums(v1)
            wall: dict[str, list[float]] = {"v1": [], "v2": []}
            cpu: dict[str, list[float]] = {"v1": [], "v2": []}
            for _ in range(args.repeats):  # alternate, so both see the same machine load
                for name, path in (("v1", v1), ("v2", v2)):
                    seconds, cpu_seconds, n_seq, nbytes = read_units(str(path), args.unit_size)
                    wall[name].append(seconds)
                    cpu[name].append(cpu_seconds)
            stored = {name: Storage.open(str(p)).size_bytes("") for name, p in (("v1", v1), ("v2", v2))}
            rows.append((mode, n_seq, nbytes, wall, cpu, stored, crc_speed(v2)))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"### Unit reads, format v1 against v2 (V = {args.vocab:,}, {args.sequences} x {args.seq_len} tokens)\n")
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
        f"python {platform.python_version()}, torch {torch.__version__}"
    )
    print(f"command: `python {' '.join(sys.argv)}`\n")
    print(
        "| classes | v1 sequences/s | v2 sequences/s | v2 / v1 wall time | v1 CPU ms / sequence "
        "| v2 CPU ms / sequence | v2 / v1 CPU time | v2 decoded MB/s | v1 B / position | v2 B / position "
        "| crc32c alone GB/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for mode, n_seq, nbytes, wall, cpu, stored, crc in rows:
        w = {name: statistics.median(t) for name, t in wall.items()}  # medians of --repeats passes
        c = {name: statistics.median(t) for name, t in cpu.items()}
        per_position = {name: b / (n_seq * positions) for name, b in stored.items()}
        print(
            f"| {mode} | {n_seq / w['v1']:,.0f} | {n_seq / w['v2']:,.0f} | {w['v2'] / w['v1']:.3f}x | "
            f"{1e3 * c['v1'] / n_seq:.2f} | {1e3 * c['v2'] / n_seq:.2f} | {c['v2'] / c['v1']:.3f}x | "
            f"{nbytes / w['v2'] / 1e6:,.1f} | {per_position['v1']:.2f} | {per_position['v2']:.2f} | {crc:.2f} |"
        )
    print(f"\n(medians of {args.repeats} passes over the cache, v1 and v2 alternating)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

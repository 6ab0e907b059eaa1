"""Storage per position of each class mode, and the speed of class sampling.

Synthetic teacher logits at a chosen vocabulary and mean entropy (default V = 151,936, about 2.8
nats): a Zipf prior over ids (BPE vocabularies number frequent tokens first, so low ids are
frequent; ``--shuffle-prior`` removes that structure for a worst case) plus Gaussian noise scaled
to reach the entropy. Each mode goes through the real path (``teacher_outputs`` -> ``PartWriter``
-> a local Zarr store) and is measured on disk, as written (format version 2: a crc32c per inner
chunk) and rewritten as format version 1 wrote it (no crc32c: :func:`drop_chunk_checksums`). Prints a
markdown table with machine and command.

    python tools/bench_storage.py [--vocab 151936] [--positions 8192] [--entropy 2.8]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec
from zarr.storage import LocalStore

from selkd.cache import format as fmt
from selkd.cache.classes import ClassSpec, sample_counts, teacher_outputs
from selkd.cache.store import Storage
from selkd.cache.writer import PartWriter, write_array

REFERENCE_BYTES = 192  # SE-KD3x reference layout: 64 slots x 3 bytes per position


def synthetic_logits(vocab: int, positions: int, entropy: float, shuffle: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    prior = -1.1 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    if shuffle:
        prior = prior[torch.randperm(vocab, generator=g)]
    noise = torch.randn(positions, vocab, generator=g)

    def mean_entropy(scale: float) -> float:
        lp = torch.log_softmax(prior + scale * noise[:256], -1)
        return float(-(lp.exp() * lp).sum(-1).mean())

    lo, hi = 0.1, 20.0  # entropy falls as the noise scale grows
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_entropy(mid) > entropy else (lo, mid)
    return prior + (lo + hi) / 2 * noise


def drop_chunk_checksums(root: Path) -> None:
    """Rewrite every array of the local store ``root`` as format version 1 wrote it (Blosc alone, no
    crc32c after it; same chunks and shards, so the same decoded values and sha256), and label it
    version 1 if it is a selkd cache. Tests use it to make version-1 caches."""
    store = LocalStore(root)
    for meta in sorted(root.rglob("zarr.json")):
        if json.loads(meta.read_text()).get("node_type") != "array":
            continue
        path = meta.parent.relative_to(root).as_posix()
        old = zarr.open_array(store, path=path, mode="r")
        compressors = [c for c in old.compressors if not isinstance(c, Crc32cCodec)]
        if len(compressors) == len(old.compressors):
            raise ValueError(f"{root}/{path}: its chunks carry no crc32c")
        zarr.create_array(
            store,
            name=path,
            data=old[:],
            chunks=old.chunks,
            shards=old.shards,
            compressors=compressors,
            overwrite=True,
            write_data=True,
        )
    header = json.loads((root / "zarr.json").read_text())
    if fmt.ROOT_ATTR in header.get("attributes", {}):
        header["attributes"][fmt.ROOT_ATTR]["format_version"] = 1
        (root / "zarr.json").write_text(json.dumps(header))


def measure(mode: str, logits: torch.Tensor, seq_len: int, root: Path, keep_every: int = 1) -> dict[str, float]:
    """Write every ``keep_every``-th sequence as one part, return bytes per stored position and more."""
    spec = ClassSpec.parse(mode)
    t, vocab = logits.shape
    n_seq = t // (seq_len - 1)
    storage = Storage.open(str(root / mode.replace(":", "-")), mode="w")
    writer = PartWriter(storage, "part-00000", "train", spec.mode, spec.k, vocab)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (n_seq, seq_len), generator=g).numpy().astype(np.int32)
    start = time.perf_counter()
    stored = 0
    errors = []
    for i in range(0, n_seq, keep_every):
        rows = logits[i * (seq_len - 1) : (i + 1) * (seq_len - 1)]
        out = teacher_outputs(rows, torch.from_numpy(tokens[i, 1:].astype(np.int64)), spec, generator=g)
        writer.add(np.array([i]), [tokens[i]], [np.zeros(seq_len, bool)], out)
        stored += seq_len - 1
        if spec.mode == "topk":
            exact = torch.topk(torch.log_softmax(rows.float(), -1), spec.k, -1).values
            f16 = torch.from_numpy(out.targets.logprobs.numpy().astype(np.float16).astype(np.float32))
            errors.append(float((f16 - exact).abs().max()))
    seconds = time.perf_counter() - start
    record = writer.commit()
    if keep_every > 1:  # sample selection also stores a score for every scored sequence
        write_array(storage, f"{fmt.SCORES_GROUP}/score-00000/seq_index", np.arange(n_seq, dtype=np.int64))
        write_array(storage, f"{fmt.SCORES_GROUP}/score-00000/score", np.random.rand(n_seq).astype(np.float32))
    total = storage.size_bytes("")
    drop_chunk_checksums(root / mode.replace(":", "-"))
    total_v1 = storage.size_bytes("")
    result = {
        "bytes_per_stored_v1": total_v1 / stored,
        "bytes_per_stored": total / stored,
        "bytes_per_corpus": total / (n_seq * (seq_len - 1)),
        "part_bytes": record["bytes"],
        "positions_per_s": stored / seconds,
        "max_abs_err": max(errors) if errors else float("nan"),
    }
    if spec.mode == "sample":
        result["mean_unique"] = record["sum_unique_ids"] / record["n_targets"]
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--positions", type=int, default=8 * 511, help="target positions (multiple of seq-len - 1)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--entropy", type=float, default=2.8)
    ap.add_argument("--modes", nargs="+", default=["sample:50", "topk:64", "topk:16"])
    ap.add_argument("--shuffle-prior", action="store_true", help="ids carry no frequency order (worst case)")
    args = ap.parse_args(argv)

    logits = synthetic_logits(args.vocab, args.positions, args.entropy, args.shuffle_prior, seed=0)
    lp = torch.log_softmax(logits[:512], -1)
    ent = float(-(lp.exp() * lp).sum(-1).mean())
    root = Path(tempfile.mkdtemp(prefix="selkd-bench-"))
    rows = []
    try:
        for mode in args.modes:
            r = measure(mode, logits, args.seq_len, root)
            rows.append((mode, r))
            if mode.startswith("sample"):
                rows.append((f"{mode} + --sample-ratio 0.2", measure(mode, logits, args.seq_len, root / "sel", 5)))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(
        f"### Storage per position (V = {args.vocab:,}, mean teacher entropy {ent:.2f} nats, "
        f"{'shuffled' if args.shuffle_prior else 'frequency-ordered'} ids)\n"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
        f"python {platform.python_version()}, torch {torch.__version__}"
    )
    print(f"command: `python {' '.join(sys.argv)}`\n")
    print(
        "| classes | B / stored position | B / corpus position | vs fp16 logits | vs reference 192 B "
        "| mean unique ids | max log-prob error | select+encode positions/s | v1 (no crc32c): B / stored position "
        "| crc32c cost |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    full = 2 * args.vocab
    for mode, r in rows:
        uniq = f"{r['mean_unique']:.1f}" if "mean_unique" in r else "-"
        err = f"{r['max_abs_err']:.4f}" if r["max_abs_err"] == r["max_abs_err"] else "-"
        print(
            f"| {mode} | {r['bytes_per_stored']:.1f} | {r['bytes_per_corpus']:.1f} | "
            f"{full / r['bytes_per_corpus']:,.0f}x smaller | {REFERENCE_BYTES / r['bytes_per_corpus']:.1f}x smaller | "
            f"{uniq} | {err} | {r['positions_per_s']:,.0f} | {r['bytes_per_stored_v1']:.2f} | "
            f"+{r['bytes_per_stored'] - r['bytes_per_stored_v1']:.2f} B "
            f"({r['bytes_per_stored'] / r['bytes_per_stored_v1'] - 1:+.2%}) |"
        )
    # class selection alone, as the builder calls it (2,048 positions at a time), and the sampling step alone
    g = torch.Generator().manual_seed(0)
    x = logits[:2048]
    nxt = torch.zeros(len(x), dtype=torch.long)
    start = time.perf_counter()
    teacher_outputs(x, nxt, ClassSpec.parse("sample:50"), generator=g)
    select_rate = len(x) / (time.perf_counter() - start)
    probs = torch.softmax(x[:512], -1)
    start = time.perf_counter()
    sample_counts(probs, 50, g)
    sample_rate = 512 / (time.perf_counter() - start)
    print(
        f"\nclass selection `sample:50` (softmax, exact entropy, next-token log-prob, 50 draws, unique ids and "
        f"counts): {select_rate:,.0f} positions/s; the sampling step alone (draws, unique, counts): "
        f"{sample_rate:,.0f} positions/s; the reference code: about 4 positions/s on a 2-core CPU"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

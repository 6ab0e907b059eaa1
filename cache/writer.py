"""PartWriter: encode teacher outputs for a part's sequences, write its arrays, commit it.

A part is invisible until its commit record (``selkd/commits/<part>.json``, one atomic object)
exists; the record carries a sha256 per array, so a reader or ``verify`` can tell a complete,
intact part from anything else. Arrays are written whole, once (one shard per array), because a
partial write of a sharded array rewrites the shard.
"""

from __future__ import annotations

import hashlib
import socket
import time
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from selkd.cache import format as fmt
from selkd.cache.classes import TeacherOutputs
from selkd.cache.store import Storage


def array_checksum(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()


def _chunk_codecs(dtype: np.dtype) -> list[BloscCodec | Crc32cCodec]:
    """Blosc, then a crc32c of the compressed bytes (format version 2): every read of a chunk checks it."""
    shuffle = "bitshuffle" if dtype == np.bool_ else "shuffle"
    return [BloscCodec(cname="zstd", clevel=5, shuffle=shuffle), Crc32cCodec()]


def write_array(storage: Storage, path: str, values: np.ndarray) -> None:
    """One array as one shard of ~CHUNK_BYTES inner chunks, written in one go; each inner chunk ends
    with its crc32c (the shard's index has one too: zarr's default)."""
    row_bytes = values.dtype.itemsize * int(np.prod(values.shape[1:], dtype=np.int64))
    rows = fmt.chunk_rows(row_bytes, values.shape[0])
    chunks = (rows, *values.shape[1:])
    n_chunks = max(1, -(-values.shape[0] // rows))
    shards = (n_chunks * rows, *values.shape[1:])
    zarr.create_array(
        storage.store,
        name=path,
        data=values,
        chunks=chunks,
        shards=shards,
        compressors=_chunk_codecs(values.dtype),
        overwrite=True,
        write_data=True,
    )


class PartWriter:
    """Collects one part's sequences batch by batch, then writes and commits them.

    Batches are encoded as they arrive (numpy, vectorised), so the memory held is about the
    encoded size of the part.
    """

    def __init__(self, storage: Storage, name: str, split: str, mode: str, k: int, vocab_size: int) -> None:
        self.storage, self.name, self.split = storage, name, split
        self.mode, self.k, self.vocab_size = mode, k, vocab_size
        self.chunks: dict[str, list[np.ndarray]] = {spec.name: [] for spec in fmt.array_specs(mode)}
        self.seq_lengths: list[np.ndarray] = []
        self.entry_counts: list[np.ndarray] = []  # sample mode: entries per sequence

    def add(
        self,
        seq_index: np.ndarray,
        sequences: list[np.ndarray],
        doc_start: list[np.ndarray],
        outputs: TeacherOutputs,
    ) -> None:
        """Add a batch: ``outputs`` holds the targets of every sequence's L_i - 1 positions,
        concatenated in sequence order (leading shape [sum(L_i - 1)])."""
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        n_targets = int((lengths - 1).sum())
        if outputs.entropy.shape[0] != n_targets:
            raise ValueError(f"batch has {n_targets} target positions but {outputs.entropy.shape[0]} outputs")
        c = self.chunks
        c["seq_index"].append(np.asarray(seq_index, dtype=np.int64))
        c["input_ids"].append(np.concatenate(sequences).astype(np.int32))
        c["doc_start"].append(np.concatenate(doc_start).astype(np.bool_))
        c["teacher_entropy"].append(outputs.entropy.cpu().numpy().astype(np.float16))
        c["teacher_logprob"].append(outputs.next_logprob.cpu().numpy().astype(np.float16))
        self.seq_lengths.append(lengths)
        t = outputs.targets
        if self.mode == "sample":
            ids = t.ids.cpu().numpy()  # type: ignore[union-attr]
            counts = torch.round(t.logprobs.exp() * t.num_draws).cpu().numpy().astype(np.int64)
            num, deltas, cnt = fmt.encode_sample(ids, counts)
            c["num_classes"].append(num)
            c["class_ids"].append(deltas)
            c["class_counts"].append(cnt)
            per_seq = np.add.reduceat(num.astype(np.int64), fmt.segment_starts(lengths - 1)) if n_targets else None
            if per_seq is not None:
                per_seq[lengths - 1 == 0] = 0
            self.entry_counts.append(per_seq if per_seq is not None else np.zeros(len(lengths), np.int64))
        elif self.mode == "topk":
            c["class_ids"].append(t.ids.cpu().numpy().astype(np.int32))  # type: ignore[union-attr]
            c["class_logprobs"].append(fmt.encode_f16_rows(t.logprobs.cpu().numpy()))
            c["tail_logmass"].append(t.tail_logmass.cpu().numpy().astype(np.float16))  # type: ignore[union-attr]
        else:
            c["class_logprobs"].append(t.logprobs.cpu().numpy().astype(np.float16))

    def arrays(self) -> dict[str, np.ndarray]:
        """The part's arrays as they will be stored."""
        out: dict[str, np.ndarray] = {}
        lengths = np.concatenate(self.seq_lengths) if self.seq_lengths else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        for spec in fmt.array_specs(self.mode):
            if spec.name == "seq_offsets":
                out[spec.name] = offsets
            elif spec.name == "class_offsets":
                per_seq = np.concatenate(self.entry_counts) if self.entry_counts else np.zeros(0, np.int64)
                co = np.zeros(len(per_seq) + 1, dtype=np.int64)
                np.cumsum(per_seq, out=co[1:])
                out[spec.name] = co
            else:
                parts = self.chunks[spec.name]
                if parts:
                    out[spec.name] = np.concatenate(parts).astype(spec.dtype)
                else:
                    width = {"k": self.k, "vocab": self.vocab_size, None: None}[spec.width]
                    shape = (0,) if width is None else (0, width)
                    out[spec.name] = np.zeros(shape, dtype=spec.dtype)
        return out

    def commit(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write every array (replacing any leftovers of an earlier, interrupted attempt), then the
        commit record. Returns the record."""
        prefix = f"{fmt.PARTS_GROUP}/{self.name}"
        self.storage.delete_prefix(prefix)
        arrays = self.arrays()
        for name, values in arrays.items():
            write_array(self.storage, f"{prefix}/{name}", values)
        stats = part_stats(self.mode, self.k, arrays)
        record = {
            "part": self.name,
            "split": self.split,
            "arrays": {
                name: {"sha256": array_checksum(v), "shape": list(v.shape), "dtype": str(v.dtype)}
                for name, v in arrays.items()
            },
            "bytes": self.storage.size_bytes(prefix + "/"),
            "written_by": {"host": socket.gethostname(), "time": time.time()},
            **stats,
            **(extra or {}),
        }
        self.storage.write_json(f"{fmt.COMMITS_PREFIX}/{self.name}.json", record)
        return record


def part_stats(mode: str, k: int, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Counts and sums that ``info`` aggregates without reading the arrays again."""
    n_seq = int(arrays["seq_index"].shape[0])
    ent = arrays["teacher_entropy"].astype(np.float64)
    stats: dict[str, Any] = {
        "n_sequences": n_seq,
        "n_tokens": int(arrays["input_ids"].shape[0]),
        "n_targets": int(ent.shape[0]),
        "sum_teacher_entropy": float(ent.sum()),
        "sum_unique_ids": None,
        "sum_kept_mass": None,
    }
    if mode == "sample":
        stats["n_entries"] = int(arrays["class_ids"].shape[0])
        stats["sum_unique_ids"] = int(arrays["num_classes"].astype(np.int64).sum())
    elif mode == "topk":
        lp = fmt.decode_f16_rows(arrays["class_logprobs"]).astype(np.float64)
        stats["sum_kept_mass"] = float(np.exp(lp).sum())
    return stats

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
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from selkd.cache import format as fmt
from selkd.cache.codecs import TargetCodec, codec_for
from selkd.cache.store import Storage

if TYPE_CHECKING:  # torch; verify checks checksums without it
    from selkd.cache.classes import TeacherOutputs


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

    Batches are encoded as they arrive (numpy, vectorised, by the mode's codec), so the memory held is
    about the encoded size of the part.
    """

    def __init__(self, storage: Storage, name: str, split: str, mode: str, k: int, classes: int) -> None:
        self.storage, self.name, self.split = storage, name, split
        self.codec, self.k, self.classes = codec_for(mode), k, classes  # classes: the full-width C
        # per array, the rows of each batch (a seq+1 array: per-sequence counts, summed into offsets)
        self.chunks: dict[str, list[np.ndarray]] = {spec.name: [] for spec in self.codec.specs}
        self.padding_mass: list[np.ndarray] = []  # per batch, [T] float32: recorded, not stored

    def add(
        self,
        seq_index: np.ndarray,
        sequences: list[np.ndarray],
        doc_start: list[np.ndarray],
        outputs: TeacherOutputs,
        loss_mask: list[np.ndarray] | None = None,
    ) -> None:
        """Add a batch: ``outputs`` holds the targets of every sequence's L_i - 1 positions,
        concatenated in sequence order (leading shape [sum(L_i - 1)]); ``loss_mask``: bool [L_i] per
        sequence, True at trained tokens (None: all)."""
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        n_targets = int((lengths - 1).sum())
        if outputs.entropy.shape[0] != n_targets:
            raise ValueError(f"batch has {n_targets} target positions but {outputs.entropy.shape[0]} outputs")
        rows = {
            "seq_index": np.asarray(seq_index, dtype=np.int64),
            "seq_offsets": lengths,
            "input_ids": np.concatenate(sequences).astype(np.int32),
            "doc_start": np.concatenate(doc_start).astype(np.bool_),
            "loss_mask": np.concatenate(loss_mask).astype(np.bool_)
            if loss_mask is not None
            else np.ones(int(lengths.sum()), np.bool_),
            "teacher_entropy": outputs.entropy.cpu().numpy().astype(np.float16),
            "teacher_logprob": outputs.next_logprob.cpu().numpy().astype(np.float16),
            **self.codec.encode(outputs.targets, lengths - 1),
        }
        for name, values in rows.items():
            self.chunks[name].append(values)
        self.padding_mass.append(outputs.padding_mass.float().cpu().numpy())

    def arrays(self) -> dict[str, np.ndarray]:
        """The part's arrays as they will be stored."""
        out: dict[str, np.ndarray] = {}
        for spec in self.codec.specs:
            parts = self.chunks[spec.name]
            if spec.per == "seq+1":
                counts = np.concatenate(parts) if parts else np.zeros(0, np.int64)
                offsets = np.zeros(len(counts) + 1, dtype=np.int64)
                np.cumsum(counts, out=offsets[1:])
                out[spec.name] = offsets
            elif parts:
                out[spec.name] = np.concatenate(parts).astype(spec.dtype)
            else:
                width = {"k": self.k, "vocab": self.classes, None: None}[spec.width]
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
        record = {
            "part": self.name,
            "split": self.split,
            "arrays": {
                name: {"sha256": array_checksum(v), "shape": list(v.shape), "dtype": str(v.dtype)}
                for name, v in arrays.items()
            },
            "bytes": self.storage.size_bytes(prefix + "/"),
            "written_by": {"host": socket.gethostname(), "time": time.time()},
            **part_stats(self.codec, arrays),
            **padding_stats(self.padding_mass),
            **(extra or {}),
        }
        self.storage.write_json(f"{fmt.COMMITS_PREFIX}/{self.name}.json", record)
        return record


def part_stats(codec: TargetCodec, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Counts and sums that ``info`` aggregates without reading the arrays again (the mode's from its codec)."""
    ent = arrays["teacher_entropy"].astype(np.float64)
    mask, first = arrays["loss_mask"], arrays["seq_offsets"][:-1]
    return {
        "n_sequences": int(arrays["seq_index"].shape[0]),
        "n_tokens": int(arrays["input_ids"].shape[0]),
        "n_targets": int(ent.shape[0]),
        "n_trained": int(mask.sum()) - int(mask[first].sum()),  # a sequence's first token is no target
        "sum_teacher_entropy": float(ent.sum()),
        **codec.stats(arrays),
    }


def padding_stats(batches: list[np.ndarray]) -> dict[str, float]:
    """The teacher's mass on padded head rows (ids >= the number of classes) over a part's positions: its
    sum and max (0.0 when the head has no padding or puts no mass there)."""
    mass = np.concatenate(batches).astype(np.float64) if batches else np.zeros(0)
    return {"sum_padding_mass": float(mass.sum()), "max_padding_mass": float(mass.max(initial=0.0))}

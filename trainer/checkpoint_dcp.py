"""Sharded model and optimizer state for FSDP2 runs: every rank writes and reads its own shard with
``torch.distributed.checkpoint`` (DCP), so no process ever holds the full state.

The gathered layout (``selkd.trainer.checkpoint``) puts the full state dict on rank 0: about 16 bytes per
parameter of host memory in one process (fp32 weights and AdamW's two moments, plus the file buffers),
some 128 GB for an 8B student. Here each rank hands DCP its local shards (``DTensor`` views of what it
holds anyway) and DCP writes ``__<rank>_0.distcp`` per rank, so a save needs next to no extra memory.
Loading goes the other way and reshards: DCP reads the pieces each rank's tensors cover, so a
checkpoint of 2 FSDP2 ranks loads on 2, on another number, under DDP or in one process.

Only tensors go through DCP (the model's state dict and the optimizer's per-parameter ``state``); the
optimizer's ``param_groups`` (floats, tuples) are the caller's to store (the gathered layout's weights-only
file), because DCP stores non-tensor values as pickles and reads them with ``torch.load(weights_only=False)``.

DCP's own index (``.metadata``) is a pickle that ``FileSystemReader`` reads with ``pickle.load``: whoever
wrote the file could run code in the reader. So rank 0 re-encodes it after the save as a ``torch.save``
file (:data:`METADATA_FILE`), removes ``.metadata``, and :class:`_Reader` loads that file with
``torch.load(weights_only=True)``, allowing only DCP's metadata classes (:data:`_METADATA_CLASSES`). The one
pickle read is DCP's ``.metadata`` that this process wrote a moment before, in its own ``.tmp-<pid>``
directory; nothing read back from a checkpoint is unpickled.

Every rank must see the checkpoint directory (a shared file system across nodes): each writes its shard
there, and each reads what it needs on load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

__all__ = ["METADATA_FILE", "is_shard_file", "load_shards", "local_state", "save_shards"]

METADATA_FILE = "dcp-metadata.pt"
_DCP_METADATA = ".metadata"
# What a DCP index holds besides tensors' dtypes and sizes (allowed by weights_only already).
_METADATA_CLASSES = [
    dcp_metadata.Metadata,
    dcp_metadata.MetadataIndex,
    dcp_metadata.TensorStorageMetadata,
    dcp_metadata.TensorProperties,
    dcp_metadata.ChunkStorageMetadata,
    dcp_metadata._MEM_FORMAT_ENCODING,
    _StorageInfo,
]


def is_shard_file(name: str) -> bool:
    """Whether ``name`` is one rank's DCP data file (``__<rank>_<n>.distcp``)."""
    return name.startswith("__") and name.endswith(".distcp")


def local_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """This rank's shards: ``{"model": {name: tensor}, "optimizer": {name: {"step", "exp_avg", ...}}}`` (views,
    no copies; ``DTensor`` under FSDP2) and, apart, ``"param_groups"`` (plain values, for the caller's file).
    A collective under a process group (the optimizer's names are agreed on)."""
    state: dict[str, Any] = {"model": get_model_state_dict(model), "param_groups": None}
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer)
        _tensors_only(osd["state"])
        state["optimizer"], state["param_groups"] = osd["state"], osd["param_groups"]
    return state


def _tensors_only(tree: Any, where: str = "optimizer state") -> None:
    """Refuse a non-tensor leaf: DCP would pickle it (and unpickle it on load)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            _tensors_only(v, f"{where}.{k}")
    elif not isinstance(tree, torch.Tensor):
        raise TypeError(f"{where} is a {type(tree).__name__}: the sharded checkpoint stores tensors only")


def _tensor_part(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k in ("model", "optimizer")}


def _first_failure(err: CheckpointException) -> BaseException:
    """The error a rank raised inside DCP (DCP wraps every rank's failure, and raises it on all ranks)."""
    for exc, _trace in err.failures.values():
        return exc
    return RuntimeError(str(err))


def save_shards(directory: Path, state: dict[str, Any], coordinator: bool) -> None:
    """Write ``state``'s tensors (:func:`local_state`) into ``directory`` (which exists): each rank its own
    ``__<rank>_0.distcp``, fsynced. A collective; returns once every rank's shard is written. The
    ``coordinator`` (rank 0) then replaces DCP's pickled index with :data:`METADATA_FILE`. A failure on any
    rank is raised on every rank as that rank's error."""
    try:
        dcp.save(_tensor_part(state), storage_writer=dcp.FileSystemWriter(str(directory), sync_files=True))
    except CheckpointException as err:
        raise _first_failure(err) from None
    if coordinator:
        index = dcp.FileSystemReader(str(directory)).read_metadata()  # written by this process just now
        index.storage_meta = None  # the tmp path and save id: nothing a reader needs
        with open(directory / METADATA_FILE, "wb") as f:
            torch.save(index, f)
            f.flush()
            os.fsync(f.fileno())
        (directory / _DCP_METADATA).unlink()


class _Reader(dcp.FileSystemReader):
    """DCP's file reader, with the index read by ``torch.load(weights_only=True)`` instead of ``pickle.load``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        try:
            with torch.serialization.safe_globals(_METADATA_CLASSES):
                index = torch.load(Path(self.path) / METADATA_FILE, map_location="cpu", weights_only=True)
        except Exception as err:
            first = (str(err).splitlines() or [type(err).__name__])[0]
            raise ValueError(f"{METADATA_FILE}: refused or unreadable (only DCP's index is loaded): {first}") from err
        if not isinstance(index, dcp_metadata.Metadata):
            raise ValueError(f"{METADATA_FILE} holds a {type(index).__name__}, not a DCP index")
        index.storage_meta = dcp_metadata.StorageMeta(load_id=self.load_id)
        return index


def load_shards(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Read the pieces of a sharded checkpoint this rank's tensors cover (any world size) into
    :func:`local_state` of ``model``/``optimizer``, and return that state for ``set_*_state_dict``
    (``"param_groups"`` is None: the caller has them). A collective; a failure on any rank (a missing or
    damaged file, a tensor that does not fit) is raised on every rank as that rank's error."""
    state = local_state(model, optimizer)
    try:
        dcp.load(_tensor_part(state), storage_reader=_Reader(str(directory)))
    except CheckpointException as err:
        raise _first_failure(err) from None
    return state

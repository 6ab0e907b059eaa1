"""The files of a checkpoint, each written, flushed and fsynced before the checkpoint's ``COMPLETE``: JSON,
``torch.load(weights_only=True)`` files and safetensors weights (tied weights stored once, their aliases in
the metadata). Nothing here pickles arbitrary objects: a file holding anything but tensors and plain
containers is refused when read. A full disk while writing names the file (see :mod:`selkd.cache.errors`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from selkd.cache.errors import SelkdError, disk_full_error
from selkd.trainer.checkpoint_dir import fsync_file

_TIED_KEY = "selkd.tied"  # safetensors metadata: JSON {alias: stored name}


class CheckpointError(SelkdError, RuntimeError):
    """A checkpoint cannot be written or read; the message names the directory or file."""


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Name ``path`` in a full disk's error: safetensors says only ``(os error 28)`` and ``torch.save``'s
    ``RuntimeError`` hides an ``OSError`` without a file name."""
    try:
        yield
    except Exception as err:
        full = disk_full_error(err)
        if full is None or full.filename:
            raise
        raise OSError(full.errno, full.strerror, str(path)) from err


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, fsynced."""
    with _writing(path), open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def torch_save(path: Path, obj: Any) -> None:
    """``obj`` with ``torch.save`` at ``path``, fsynced; read back with :func:`torch_load`."""
    with _writing(path), open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{path}: refused or unreadable (only weights_only-safe content is loaded): {err}"
        ) from err


def read_json(path: Path) -> Any:
    """The JSON at ``path``; CheckpointError naming it when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable: {err}") from err


def save_weights(path: Path, state_dict: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> None:
    """safetensors of the unique tensors; ``aliases`` (tied names) are recorded in the metadata."""
    tensors: dict[str, torch.Tensor] = {}
    stored_aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    for name, t in state_dict.items():
        if name in aliases and aliases[name] in state_dict:
            stored_aliases[name] = aliases[name]
            continue
        t = t.detach()
        # Any other tensors sharing memory (safetensors refuses them): identical views become aliases,
        # partial overlaps are copied.
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            stored_aliases[name] = seen[key]
            continue
        if t.numel():
            seen[key] = name
        tensors[name] = t
    ptrs: dict[int, str] = {}
    for name, t in list(tensors.items()):
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in ptrs:
            tensors[name] = t.clone()
        elif t.numel():
            ptrs[ptr] = name
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    with _writing(path):
        save_file(tensors, str(path), metadata={"format": "pt", _TIED_KEY: json.dumps(stored_aliases)})
        fsync_file(path)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full state dict with tied aliases pointing at their stored tensor."""
    try:
        state = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable safetensors file: {err}") from err
    for alias, name in json.loads(meta.get(_TIED_KEY, "{}")).items():
        state[alias] = state[name]
    return state

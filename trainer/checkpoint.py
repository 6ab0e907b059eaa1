"""Crash-safe, resumable training checkpoints: ``OUT/checkpoints/step-000123/``.

Layout of one checkpoint (every file is written, flushed and fsynced before ``COMPLETE``)::

    model.safetensors    gathered layout: the full state dict; tied weights stored once, aliases in metadata
    __<rank>_0.distcp    sharded layout (FSDP2): each rank's shard of the weights and AdamW moments
    dcp-metadata.pt      sharded layout: DCP's index of the shards (see selkd.trainer.checkpoint_dcp)
    optimizer.pt         {"optimizer": ..., "scheduler": ...}; loaded ONLY with weights_only=True (in the
                         sharded layout "optimizer" holds only the param_groups)
    rank-00000.pt        per rank: RNG states (python, numpy, torch CPU, CUDA) and the caller's
                         ``rank_state`` (e.g. a GlobalQueue); weights_only-loadable
    loader.json          the data loader's state
    config.json          the run's config (TrainConfig.to_dict())
    state.json           step, world size, layout, the caller's ``extra`` (metrics, ...)
    COMPLETE             written last: {"step": ..., "files": {name: size}}

Why it is built this way:

* Atomic: files go into ``step-000123.tmp-<pid>``, are fsynced, ``COMPLETE`` is written last, then the
  directory is renamed to ``step-000123`` (and the parent fsynced). A crash at any point leaves either
  a complete checkpoint or a directory no reader accepts. :func:`latest_checkpoint` scans for complete
  directories instead of following a ``latest`` pointer file, which could be stale or point at a
  directory that was being deleted.
* A failed write leaves nothing behind: whatever stops it (a full disk, an error, Ctrl-C), the
  ``.tmp-<pid>`` directory is removed before the error goes up, and a full disk becomes one
  :class:`CheckpointError` line saying what to free and that a rerun resumes from the last complete
  checkpoint (safetensors and ``torch.save`` report ENOSPC in their own error types; see
  :mod:`selkd.cache.errors`).
* Deletion is the reverse: a directory is first renamed out of the ``step-N`` namespace
  (``.trash-<pid>``) and only then removed, so a crash mid-``rmtree`` never leaves a ``step-N`` with
  ``COMPLETE`` but missing files.
* No pickle of arbitrary objects: weights are safetensors, everything else is JSON or a
  ``torch.load(weights_only=True)`` file (tensors, numbers, strings, lists, tuples, dicts). AdamW's
  state dict and LambdaLR's are within that subset; a file holding anything else is refused.
* Distributed (DDP, FSDP2): saving and loading are collectives that every rank calls. The layout is
  looked up from the model's parallelism (:data:`LAYOUT_BY_PARALLELISM`) and recorded in ``state.json``;
  loading follows the recorded one.

  - gathered (one process, DDP): state dicts are gathered as full, CPU-offloaded dicts with
    ``torch.distributed.checkpoint.state_dict``, rank 0 writes, and on load rank 0 reads and broadcasts
    (``broadcast_from_rank0``); only rank 0 needs to see ``OUT``.
  - sharded (FSDP2): gathering would put about 16 bytes per parameter on rank 0 (128 GB for an 8B
    student), so each rank writes its own shard with DCP into the same ``.tmp-<pid>`` directory (made
    by rank 0, its name broadcast); DCP's save returns on every rank once every shard is written and
    fsynced, and only then does rank 0 write the small files and ``COMPLETE`` and rename. A failure on
    any rank is raised on every rank and rank 0 removes the directory. Every rank must see ``OUT``.

  Checkpoints are interchangeable between plain, DDP and FSDP2 runs, of any world size (keys are the
  unwrapped module's parameter names; optimizer state is keyed by those names, not by index; DCP
  reshards on load). Without a process group the same functions work on a plain module.
* The final model (:func:`save_final`) is gathered: rank 0 holds the full weights once, at the end
  (4 bytes per fp32 parameter, no optimizer state), for ``save_pretrained``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from selkd.cache.errors import disk_full_error, disk_full_message
from selkd.trainer import distributed as D
from selkd.trainer.checkpoint_dir import (
    CHECKPOINTS_DIR,
    COMPLETE,
    checkpoints_root,
    clean_incomplete,
    discard,
    fsync_dir,
    fsync_file,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    step_dir_name,
)
from selkd.trainer.checkpoint_files import CheckpointError, read_json, torch_load, torch_save, write_json
from selkd.trainer.checkpoint_layout import LAYOUT_BY_PARALLELISM, LAYOUTS, gather_model

__all__ = [
    "CHECKPOINTS_DIR",
    "COMPLETE",
    "CheckpointError",
    "CheckpointState",
    "clean_incomplete",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
    "save_final",
]

FINAL_DIR = "final"
OPTIMIZER_FILE = "optimizer.pt"
LOADER_FILE = "loader.json"
CONFIG_FILE = "config.json"
STATE_FILE = "state.json"
FORMAT_VERSION = 1


@dataclass
class CheckpointState:
    """What :func:`load_checkpoint` returns besides restoring model / optimizer / scheduler / RNG.

    rank_state: this rank's ``rank_state`` as saved (None if the checkpoint has no file for this rank,
    e.g. the world size grew). rng_restored: False in that case too (the caller may reseed)."""

    path: Path
    step: int
    loader_state: dict[str, Any]
    config: dict[str, Any]
    extra: dict[str, Any]
    world_size: int = 1
    rank_state: Any = None
    rng_restored: bool = False
    saved_at: float = 0.0
    files: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- distributed helpers


def _run_on_rank0(fn: Any, what: str) -> Any:
    """Run ``fn()`` on rank 0 and hand its result (or its failure) to every rank, so that a failed write
    raises everywhere instead of leaving the other ranks blocked in the next collective."""
    result: tuple[bool, Any] = (True, None)
    if D.rank() == 0:
        try:
            result = (True, fn())
        except Exception as err:
            if not D.is_distributed():
                raise
            # a CheckpointError already says what happened and what to do
            plain = isinstance(err, CheckpointError)
            result = (False, str(err) if plain else f"{what} failed on rank 0: {type(err).__name__}: {err}")
    ok, value = D.broadcast_object(result)
    if not ok:
        raise CheckpointError(value)
    return value


# --------------------------------------------------------------------------- RNG


def _rng_state() -> dict[str, Any]:
    """This process's RNG states in weights_only-loadable types (tensors, ints, floats, tuples)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": (int(version), torch.tensor(mt, dtype=torch.int64), gauss),
        "numpy": (
            str(kind),
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in mt.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        torch.cuda.set_rng_state_all(list(cuda[:n]))


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# --------------------------------------------------------------------------- file helpers


@contextmanager
def _half_written(tmp: Path, where: Path, rerun: str) -> Iterator[None]:
    """Remove the directory ``tmp`` being written when anything stops the write (an error, Ctrl-C), and
    turn a full disk into one :class:`CheckpointError` line about ``where``; ``rerun`` says what
    rerunning the training command then does."""
    try:
        yield
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full_error(err)
        if full is None:
            raise
        raise CheckpointError(disk_full_message(str(where), full, rerun)) from err


# --------------------------------------------------------------------------- save / load


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    loader_state: Mapping[str, Any],
    config: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    keep: int | None = 2,
    rank_state: Any = None,
) -> Path:
    """Write ``OUT/checkpoints/step-{step:06d}`` atomically and keep the newest ``keep`` (None: all).

    A collective under a process group: call it on every rank (rank 0 writes the gathered layout; under
    FSDP2 every rank writes its shard; the others send their RNG states and ``rank_state``). The layout
    follows the model's parallelism (:data:`LAYOUT_BY_PARALLELISM`). ``loader_state``, ``config`` and
    ``extra`` must be JSON-able (rank 0's values are written); ``rank_state`` is anything
    ``torch.load(weights_only=True)`` accepts (tensors, numbers, strings, containers), e.g.
    ``GlobalQueue.state_dict()``. An existing checkpoint of the same step is replaced. Returns the
    checkpoint's path on every rank.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    name = LAYOUT_BY_PARALLELISM[D.parallelism(model)]
    layout = LAYOUTS[name]
    payload = layout.collect(model, optimizer)
    per_rank = D.gather_objects({"rng": _rng_state(), "state": _to_cpu(rank_state)})
    final = checkpoints_root(out_dir) / step_dir_name(step)
    tmp, rerun = _run_on_rank0(lambda: _open_tmp(out_dir, final), f"saving checkpoint {final}")
    with _half_written(tmp, final, rerun) if D.rank() == 0 else contextlib.nullcontext():
        layout.write_collective(tmp, payload)
    sched = scheduler.state_dict() if scheduler is not None else None
    optim = {"optimizer": layout.optimizer_file(payload), "scheduler": sched}
    state = {"format": FORMAT_VERSION, "layout": name, "step": int(step), "extra": dict(extra or {})}

    def write() -> Path:
        assert per_rank is not None
        world = len(per_rank)
        files = {
            **layout.rank0_files(payload),
            OPTIMIZER_FILE: lambda path: torch_save(path, optim),
            **{f"rank-{r:05d}.pt": functools.partial(torch_save, obj=obj) for r, obj in enumerate(per_rank)},
            LOADER_FILE: lambda path: write_json(path, dict(loader_state)),
            CONFIG_FILE: lambda path: write_json(path, dict(config)),
            STATE_FILE: lambda path: write_json(path, {**state, "world_size": world, "saved_at": time.time()}),
        }
        with _half_written(tmp, final, rerun):
            _finish_checkpoint_dir(tmp, final, int(step), files)
        if keep is not None:
            prune_checkpoints(out_dir, keep)
        return final

    return Path(_run_on_rank0(write, f"saving checkpoint {final}"))


def _open_tmp(out_dir: str | Path, final: Path) -> tuple[Path, str]:
    """A fresh ``final.tmp-<pid>`` directory to write into (rank 0; half-written ones of a crash are removed
    first), and what rerunning the training command does if this save fails."""
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    clean_incomplete(out_dir)
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    previous = latest_checkpoint(out_dir)
    rerun = f"it resumes from {previous.name}" if previous else "it starts over (no checkpoint was complete yet)"
    return tmp, rerun


def _finish_checkpoint_dir(tmp: Path, final: Path, step: int, files: Mapping[str, Callable[[Path], None]]) -> None:
    """Write ``files`` ({name: writer(path)}, in order) into ``tmp`` (next to what every rank wrote there),
    ``COMPLETE`` (every file and its size) last, fsynced, then rename ``tmp`` to ``final``. The caller
    removes ``tmp`` when this fails (see :func:`_half_written`)."""
    for name, write in files.items():
        write(tmp / name)
    sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    write_json(tmp / COMPLETE, {"step": step, "files": sizes})
    fsync_dir(tmp)
    if final.exists():
        discard(final)
    tmp.rename(final)
    fsync_dir(final.parent)


def _read_checkpoint(path: Path, need_optimizer: bool, need_scheduler: bool) -> dict[str, Any]:
    """Everything of a checkpoint in memory (rank 0 only). Every problem is found here, before any
    collective, so that it can be reported to all ranks instead of hanging them."""
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)")
    complete = read_json(path / COMPLETE)
    for name, size in complete.get("files", {}).items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            raise CheckpointError(f"{path}: {name} is missing or has the wrong size (damaged checkpoint)")
    state = read_json(path / STATE_FILE)
    world = int(state.get("world_size", 1))
    layout = state.get("layout", "gathered")  # checkpoints from before the sharded layout are gathered
    if layout not in LAYOUTS:
        raise CheckpointError(f"{path}: unknown layout {layout!r} in {STATE_FILE} (written by a newer selkd?)")
    optim = torch_load(path / OPTIMIZER_FILE)
    if not isinstance(optim, dict):
        raise CheckpointError(f"{path / OPTIMIZER_FILE}: expected a dict, got {type(optim).__name__}")
    if need_optimizer and optim.get("optimizer") is None:
        raise CheckpointError(f"{path}: holds no optimizer state")
    if need_scheduler and optim.get("scheduler") is None:
        raise CheckpointError(f"{path}: holds no scheduler state")
    return {
        "layout": layout,
        "model": LAYOUTS[layout].read(path),
        "optim": optim,
        "ranks": [
            torch_load(path / f"rank-{r:05d}.pt") if (path / f"rank-{r:05d}.pt").is_file() else None
            for r in range(world)
        ],
        "loader": read_json(path / LOADER_FILE),
        "config": read_json(path / CONFIG_FILE),
        "state": state,
        "files": dict(complete.get("files", {})),
    }


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    *,
    restore_rng: bool = True,
) -> CheckpointState:
    """Restore model, optimizer, scheduler and (with ``restore_rng``) this rank's RNG states from a complete
    checkpoint; return the rest as a :class:`CheckpointState`.

    A collective under a process group: every rank calls it with the same ``path``; only rank 0 reads files
    and the state is broadcast. Wrap the model (DDP / FSDP2) and build the optimizer on it *before*
    loading. The scheduler is restored after the optimizer, so its ``last_epoch``/``base_lrs`` win.
    """
    path = Path(path)
    data = _read_on_rank0(path, optimizer is not None, scheduler is not None)
    LAYOUTS[data["layout"]].restore(path, model, optimizer, data)
    small = D.broadcast_object(
        {**{k: data[k] for k in ("loader", "config", "state", "files")}, "scheduler": data["optim"].get("scheduler")}
        if D.rank() == 0
        else None
    )
    if scheduler is not None:
        scheduler.load_state_dict(small["scheduler"])
    mine = _scatter_rank_states(data["ranks"])
    rng_restored = False
    if mine is not None and restore_rng:
        _set_rng_state(mine["rng"])
        rng_restored = True
    state = small["state"]
    return CheckpointState(
        path=path,
        step=int(state["step"]),
        loader_state=small["loader"],
        config=small["config"],
        extra=dict(state.get("extra", {})),
        world_size=int(state.get("world_size", 1)),
        rank_state=mine["state"] if mine is not None else None,
        rng_restored=rng_restored,
        saved_at=float(state.get("saved_at", 0.0)),
        files=small["files"],
    )


def _read_on_rank0(path: Path, need_optimizer: bool, need_scheduler: bool) -> dict[str, Any]:
    """:func:`_read_checkpoint` on rank 0; a problem there raises on every rank (instead of hanging the
    others in the next collective). The other ranks get empty state dicts to receive the broadcast into."""
    distributed = D.is_distributed()
    data: dict[str, Any] | None = None
    error: str | None = None
    if D.rank() == 0:
        try:
            data = _read_checkpoint(path, need_optimizer, need_scheduler)
        except CheckpointError as err:
            if not distributed:
                raise
            error = str(err)
    if distributed:
        error, layout = D.broadcast_object((error, data["layout"] if data is not None else None))
        if error is not None:
            raise CheckpointError(error)
    if data is None:
        data = {"layout": layout, "model": {}, "optim": {"optimizer": {}, "scheduler": None}, "ranks": None}
    return data


def _scatter_rank_states(ranks: list[Any] | None) -> Any:
    """This rank's saved ``{"rng", "state"}`` (None when the checkpoint has no file for it)."""
    if not D.is_distributed():
        return ranks[0] if ranks else None
    objs = None
    if D.rank() == 0:
        assert ranks is not None
        objs = [ranks[r] if r < len(ranks) else None for r in range(D.world_size())]
    return D.scatter_objects(objs)


def save_final(out_dir: str | Path, model: nn.Module, tokenizer: Any = None) -> Path:
    """``OUT/final``: a plain Hugging Face directory (safetensors weights, config, tokenizer) that
    ``AutoModelForCausalLM.from_pretrained`` loads. A collective under a process group (the weights are
    gathered); rank 0 writes into ``final.tmp-<pid>`` and renames, replacing an older ``final``."""
    state_dict = gather_model(model)
    inner = D.unwrap_model(model)
    out = Path(out_dir) / FINAL_DIR

    def write() -> Path:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{FINAL_DIR}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        save = getattr(inner, "save_pretrained", None)
        if save is None:
            raise CheckpointError(f"{type(inner).__name__} has no save_pretrained (not a Hugging Face model)")
        with _half_written(tmp, out, "it finds the run complete and writes the final model again"):
            save(str(tmp), state_dict=state_dict)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            for p in tmp.rglob("*"):
                if p.is_file():
                    fsync_file(p)
            fsync_dir(tmp)
        if out.exists():
            old = out.with_name(f"{FINAL_DIR}.trash-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
        fsync_dir(out.parent)
        return out

    return Path(_run_on_rank0(write, f"saving the final model to {out}"))

"""Process-group setup and model wrapping for ``torchrun`` runs (and the same calls in one process).

The runtime contract is torchrun's: it sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (plus
``MASTER_ADDR``/``MASTER_PORT``). Those variables are the only ones read; without them everything runs
in one process with no process group, and every helper here degrades to a no-op, so the training loop
has a single code path.

Backends: NCCL when the device is CUDA (one GPU per local rank), gloo on CPU (tests, debugging).

Wrapping (:func:`wrap_model`):

* FSDP2 (``fully_shard``): each decoder layer is its own unit (found through Hugging Face's
  ``_no_split_modules``, else a ``layers``/``h``/``blocks`` ``ModuleList``), then the root, which holds
  the embeddings, final norm and LM head; tied embeddings stay tied because both names live in the root
  unit. Parameters become DTensors but keep their names, so checkpoints (``selkd.trainer.checkpoint``)
  are interchangeable with DDP and single-process runs.
* DDP otherwise, when the world size is above 1.
* The plain model in one process.

Note for the selective head (``selkd.trainer.head``): under DDP, calling the inner decoder directly
bypasses DDP's forward hooks; FSDP2 installs its hooks on the modules themselves, so it does not care.
Use :func:`unwrap_model` to reach the Hugging Face model for ``save_pretrained`` or the head helpers.

Teardown (:func:`cleanup`, which also runs at exit): the process group must be freed, and its
threads joined, while the interpreter is still whole. ``destroy_process_group`` only forgets a group; it
is freed when the last Python reference goes, and a group freed during interpreter finalization can
abort the process after all its work is done (a gloo thread that takes the GIL to free a tensor is
stopped inside a C++ destructor: "terminate called without an active exception", SIGABRT). Two
references outlive ``destroy_process_group``: ``torch.distributed.nn``'s default arguments, bound to
the default group when that module is first imported (DDP imports it), and the FSDP2 device mesh,
which DTensor's sharding caches keep for the life of the process.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "cleanup",
    "decoder_layers",
    "gather_objects",
    "init_distributed",
    "is_distributed",
    "parallelism",
    "rank",
    "resolve_device",
    "scatter_objects",
    "unwrap_model",
    "world_size",
    "wrap_model",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run. ``device`` is the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    is_main: bool
    device: torch.device

    @property
    def distributed(self) -> bool:
        """Whether a process group with more than one rank is running."""
        return self.world_size > 1


def resolve_device(device: str | torch.device, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; a bare ``cuda`` also gets the
    local rank (one GPU per process under torchrun); ``cuda:N`` and ``cpu`` are kept."""
    if isinstance(device, torch.device):
        return device
    text = device.strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: CUDA is not available on this machine")
        return torch.device("cuda", local_rank)
    try:
        return torch.device(text)
    except RuntimeError as err:
        raise ValueError(f"--device {device!r}: not a device (auto, cpu, cuda, cuda:N)") from err


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={raw!r} is not an integer") from None


# Device meshes made for FSDP2 in this process; cleanup() drops the process groups they hold.
_MESHES: list[Any] = []


def init_distributed(device: str | torch.device = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), or run alone.

    Under torchrun (even with one process, so FSDP2 can be tried on one GPU) a process group is created:
    NCCL for CUDA devices, gloo otherwise, and the CUDA device is set to the local rank's. Calling it
    again when a group exists returns the same info without re-initialising. :func:`cleanup` runs at
    exit if the caller has not run it (a run that fails).
    """
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if rank is None or world is None:
        return DistInfo(0, 1, 0, True, resolve_device(device, 0))
    local = rank if local is None else local
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if dev.type == "cuda":
            kwargs["device_id"] = dev  # binds NCCL to this GPU (and initialises eagerly)
        # Imported now, torch.distributed.nn's `group=group.WORLD` defaults are None, not this group (module doc).
        importlib.import_module("torch.distributed.nn")
        dist.init_process_group(**kwargs)
        atexit.register(cleanup)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dist.get_rank() == 0, dev)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: modules whose class is in ``model._no_split_modules`` (Hugging
    Face's list of blocks that must not be split), else the children of the first ``layers``/``h``/
    ``blocks`` ``ModuleList``. Empty if none is found (then only the root is sharded)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    if names:
        found = [m for m in model.modules() if type(m).__name__ in names and m is not model]
        if found:
            return found
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks"):
            return list(module)
    return []


def wrap_model(model: nn.Module, dist_info: DistInfo, fsdp: bool = False, mp_policy: Any = None) -> nn.Module:
    """Wrap ``model`` (already on ``dist_info.device``) for data-parallel training.

    ``fsdp=True`` (with a process group): FSDP2 ``fully_shard`` per decoder layer, then the root, in
    place; returns the same module object. ``mp_policy``: an optional ``MixedPrecisionPolicy``.
    Otherwise DDP when ``world_size > 1``; otherwise the model itself.
    """
    if not dist.is_initialized():
        return model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # The mesh fully_shard would make by itself, made here so that cleanup() can reach it (module doc).
        mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size,))
        _MESHES.append(mesh)
        kwargs: dict[str, Any] = {"mesh": mesh}
        if mp_policy is not None:
            kwargs["mp_policy"] = mp_policy
        for layer in decoder_layers(model):
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        return model
    if dist_info.world_size == 1:
        return model
    if dist_info.device.type == "cuda":
        return nn.parallel.DistributedDataParallel(model, device_ids=[dist_info.device.index])
    return nn.parallel.DistributedDataParallel(model)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose parameter names are the checkpoint's keys (DDP's ``module``, torch.compile's
    ``_orig_mod``); FSDP2 (``fully_shard``) keeps the module itself."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def parallelism(model: nn.Module) -> str:
    """How ``model`` is spread over the ranks: ``"fsdp2"`` (``fully_shard`` on it or on its modules: each rank
    holds a shard of every parameter; the trainer shards the wrapper around the student, so the student's
    root is not itself an FSDP module), ``"ddp"`` (each rank a full replica) or ``"none"`` (one process)."""
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) for m in unwrap_model(model).modules()):
        return "fsdp2"
    compiled = getattr(model, "_orig_mod", None)
    return "ddp" if isinstance(compiled or model, nn.parallel.DistributedDataParallel) else "none"


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _object_device() -> torch.device | None:
    """The device object collectives must stage through: the current CUDA device under NCCL."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (a new tensor; the input is untouched). Identity in one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor.detach().clone()
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (a new tensor), e.g. token counts for exact global means."""
    out = tensor.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (e.g. the checkpoint rank 0 chose to resume)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_object_device())
    return box[0]


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's picklable ``obj`` on rank 0, in rank order (None on the other ranks)."""
    if not is_distributed():
        return [obj]
    if dist.get_backend() == "nccl":
        # gather_object is not supported by every NCCL build; all_gather_object is. The objects are small.
        out: list[Any] = [None] * world_size()
        dist.all_gather_object(out, obj)
        return out if rank() == 0 else None
    gathered: list[Any] | None = [None] * world_size() if rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def scatter_objects(objs: list[Any] | None) -> Any:
    """Rank r gets ``objs[r]`` from rank 0 (``objs`` is only read on rank 0)."""
    if not is_distributed():
        return objs[0] if objs else None
    box: list[Any] = [None]
    dist.scatter_object_list(box, objs if rank() == 0 else None, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group and free it now, joining its threads, while the interpreter is whole
    (see the module doc). Call it once every rank is done with collectives (after a :func:`barrier`),
    with the wrapped models dropped: their DDP reducer or FSDP state holds the group, which is then
    freed with them. Also runs at exit, where the models of a finished function are garbage; a call
    without a group only collects that garbage."""
    if dist.is_initialized():
        dist.destroy_process_group()
        for mesh in _MESHES:  # torch 2.13/2.14 meshes hold their groups (older ones only their names)
            registry = getattr(mesh, "_pg_registry", None)
            if isinstance(registry, dict):
                registry.clear()
        _MESHES.clear()
    gc.collect()  # models in reference cycles (FSDP's state and hooks) go now, not at finalization

"""The two layouts of a checkpoint's weights and optimizer state, looked up from the model's parallelism
(:data:`LAYOUT_BY_PARALLELISM`) and recorded in ``state.json`` (see :mod:`selkd.trainer.checkpoint`):
gathered (full state dicts on rank 0: ``model.safetensors`` and the optimizer in ``optimizer.pt``) or
sharded (FSDP2: each rank's shard through :mod:`selkd.trainer.checkpoint_dcp`). State dicts are keyed by
the unwrapped module's parameter names, so checkpoints are interchangeable between plain, DDP and FSDP2 runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from selkd.trainer import checkpoint_dcp as DCP
from selkd.trainer import distributed as D
from selkd.trainer.checkpoint_files import CheckpointError, load_weights, save_weights

MODEL_FILE = "model.safetensors"  # the gathered layout's weights


# --------------------------------------------------------------------------- model helpers


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """{alias: first name} for parameters registered under several names (tied embeddings). Found from the
    module, not from tensor storage, because gathered / CPU-offloaded state dicts hold copies."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in D.unwrap_model(model).named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _sd_options(**kw: Any) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, **kw)


def gather_model(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full, CPU-offloaded model state dict (collective under a process group; empty off rank 0)."""
    return get_model_state_dict(model, options=_sd_options(cpu_offload=True))


def _gather_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return get_optimizer_state_dict(model, optimizer, options=_sd_options(cpu_offload=True))


# --------------------------------------------------------------------------- layouts


class _Gathered:
    """The full state on rank 0: ``model.safetensors`` and the optimizer in ``optimizer.pt``. Loading reads
    them on rank 0 and broadcasts (``broadcast_from_rank0``)."""

    def collect(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        """Full, CPU-offloaded state dicts (a collective; empty off rank 0)."""
        state = {"model": gather_model(model), "aliases": _tied_aliases(model)}
        return {**state, "optimizer": _gather_optimizer(model, optimizer) if optimizer is not None else None}

    def write_collective(self, tmp: Path, payload: dict[str, Any]) -> None:
        """Nothing: rank 0 writes everything (:meth:`rank0_files`)."""

    def optimizer_file(self, payload: dict[str, Any]) -> Any:
        return payload["optimizer"]

    def rank0_files(self, payload: dict[str, Any]) -> dict[str, Callable[[Path], None]]:
        return {MODEL_FILE: lambda path: save_weights(path, payload["model"], payload["aliases"])}

    def read(self, path: Path) -> dict[str, torch.Tensor]:
        return load_weights(path / MODEL_FILE)

    def restore(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, data: Any) -> None:
        opts = _sd_options(broadcast_from_rank0=D.is_distributed(), strict=True)
        _restore_model(path, model, data["model"], opts)
        if optimizer is not None:
            _restore_optimizer(path, model, optimizer, data["optim"]["optimizer"] or {}, opts)


class _Sharded:
    """Every rank's shard of the weights and optimizer moments, written and read by every rank
    (:mod:`selkd.trainer.checkpoint_dcp`); ``optimizer.pt`` holds only the ``param_groups``."""

    def collect(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        return DCP.local_state(model, optimizer)

    def write_collective(self, tmp: Path, payload: dict[str, Any]) -> None:
        DCP.save_shards(tmp, payload, coordinator=D.rank() == 0)

    def optimizer_file(self, payload: dict[str, Any]) -> Any:
        return None if payload["param_groups"] is None else {"param_groups": payload["param_groups"]}

    def rank0_files(self, payload: dict[str, Any]) -> dict[str, Callable[[Path], None]]:
        return {}

    def read(self, path: Path) -> dict[str, torch.Tensor]:
        return {}  # every rank reads its part in restore()

    def restore(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, data: Any) -> None:
        try:
            state = DCP.load_shards(path, model, optimizer)
        except Exception as err:
            first = (str(err).splitlines() or [type(err).__name__])[0]
            raise CheckpointError(f"{path}: sharded state unreadable or not fitting this model: {first}") from err
        opts = StateDictOptions(strict=True)
        _restore_model(path, model, state["model"], opts)
        if optimizer is not None:
            groups = D.broadcast_object(data["optim"]["optimizer"]["param_groups"] if D.rank() == 0 else None)
            _restore_optimizer(path, model, optimizer, {"state": state["optimizer"], "param_groups": groups}, opts)


# The layout of a run's checkpoints, by its parallelism (distributed.parallelism): FSDP2 ranks each write
# their shard; a DDP replica or a single process has the full state anyway, and rank 0 writes it.
LAYOUT_BY_PARALLELISM = {"none": "gathered", "ddp": "gathered", "fsdp2": "sharded"}
#: The layouts by name (what ``state.json`` records as ``layout``).
LAYOUTS: dict[str, _Gathered | _Sharded] = {"gathered": _Gathered(), "sharded": _Sharded()}


def _restore_model(path: Path, model: nn.Module, model_sd: dict[str, torch.Tensor], opts: StateDictOptions) -> None:
    aliases = _tied_aliases(model)
    for alias, name in aliases.items():  # a checkpoint written by other code may lack the alias
        if name in model_sd and alias not in model_sd:
            model_sd[alias] = model_sd[name]
    try:
        set_model_state_dict(model, model_sd, options=opts)
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: the weights do not fit this model: {err}") from err


def _restore_optimizer(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, optim_sd: dict[str, Any], opts: StateDictOptions
) -> None:
    tuples = [{k for k, v in g.items() if isinstance(v, tuple)} for g in optimizer.param_groups]
    try:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: the optimizer state does not fit this optimizer: {err}") from err
    for group, keys in zip(optimizer.param_groups, tuples):  # DCP returns tuples (betas) as lists
        for k in keys:
            if isinstance(group.get(k), list):
                group[k] = tuple(group[k])

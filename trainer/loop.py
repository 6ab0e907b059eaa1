"""train(cfg): the whole distillation run, one flat loop from top to bottom (as nanoGPT's train.py).

The sections of :func:`_train` run in order: seeds; the resume check (a checkpoint in ``--out`` must
come from the same config); the student and its data (cache or online teacher); objective, wrapper,
optimizer and schedule; restoring a checkpoint; logging; the loop (:func:`step`, logging, evaluation,
checkpoint); the end (final evaluation, checkpoint, ``OUT/final``). Each piece is set up by a function
of :mod:`selkd.trainer.setup`; what is logged, and how ``metrics.jsonl`` follows a resume, is
:mod:`selkd.trainer.metrics`.

Resuming
--------
A rerun with the same ``--out`` continues from the newest complete checkpoint (weights, optimizer,
scheduler, data-loader cursor, RNG states, the selection policy's state and this rank's partial
logging window), so on CPU the resumed run logs the same losses as an uninterrupted one.

``--steps`` (or ``--epochs``) may be raised on a rerun: the run continues to the new total and the
learning-rate schedule follows it from the resumed step on (the log says so). Lowering it, or changing
any option outside :data:`selkd.trainer.config.RESUME_MUTABLE`, is refused naming the keys. A rerun of
a finished run trains nothing and only re-saves ``OUT/final`` (or, when ``--keep-checkpoints 0`` left
no checkpoint, only says that the run is complete).

Which directories ``--out`` may name, and what a failed run leaves there, is :mod:`selkd.trainer.run_dir`'s
business: a new or empty directory or a selkd-train run, never one of the run's inputs; a run that fails
before its first complete checkpoint removes what it created.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from selkd.cache.teacher import vocab_size
from selkd.trainer import checkpoint as ckpt
from selkd.trainer import distributed as D
from selkd.trainer.batch import Batch
from selkd.trainer.config import TrainConfig
from selkd.trainer.metrics import WINDOW_KEYS, MetricsLog, StepStats, log
from selkd.trainer.run_dir import CONFIG_FILE, RunDir, describe_kept
from selkd.trainer.setup import (
    Optimization,
    RankState,
    TrainError,
    check_resume,
    claim_out,
    resolve_precision,
    restore,
    seed_everything,
    setup_objective,
    setup_optimizer,
    setup_student,
    setup_tokenizer,
    wrap_student,
)
from selkd.trainer.setup_data import Data, check_student_fits, setup_data
from selkd.trainer.student import Objective, StepOutput, eval_divergences, evaluate

__all__ = ["TrainError", "memory_mb", "step", "train"]


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) one distillation run as ``cfg`` describes; returns the last logged metrics. On
    any failure, what the run created in ``--out`` is removed unless a complete checkpoint is there."""
    t_start = time.time()
    try:
        dist_info = D.init_distributed(cfg.device)
    except (RuntimeError, ValueError) as err:  # e.g. --device cuda without CUDA
        raise TrainError(str(err)) from err
    run_dir = claim_out(cfg, dist_info.is_main)
    try:
        return _train(cfg, dist_info, run_dir, t_start)
    except BaseException:
        if run_dir is not None:
            run_dir.discard_unless_resumable()
        raise


def _train(cfg: TrainConfig, dist_info: D.DistInfo, run_dir: RunDir | None, t_start: float) -> dict[str, Any]:
    """:func:`train` once ``--out`` is claimed (``run_dir``: rank 0's, None on the other ranks)."""
    main, device, out = dist_info.is_main, dist_info.device, Path(cfg.out)
    seed_everything(cfg.seed)

    # --- resume check: a checkpoint in --out must come from the same config --------------------------
    resume = check_resume(cfg, run_dir)
    if resume.latest is None and resume.finished:  # finished, and kept no checkpoint: nothing to do
        return _already_finished(out, resume.finished, main)

    # --- the student and its data: the cache (offline) or the teacher in the loop (online) ----------
    tokenizer, reader = setup_tokenizer(cfg)  # checked against the cache's before any weights load
    precision = resolve_precision(cfg)  # --dtype auto: the checkpoint's
    model = setup_student(cfg, device, precision.weights)
    data = setup_data(cfg, dist_info, tokenizer, reader)
    check_student_fits(cfg, data, vocab_size(model))

    # --- the objective, the wrapped student, optimizer and schedule -----------------------------------
    objective = setup_objective(cfg, data.temperature)
    student = wrap_student(model, cfg, dist_info, tokenizer, data.doc_attention)  # checks the selective head first
    opt = setup_optimizer(cfg, model, data.batches_per_epoch, precision)
    state = RankState.start(cfg, dist_info, objective, data)

    # --- resume: weights, optimizer, schedule, data cursor, RNG, policy and logging window --------------
    if resume.latest is not None:
        restore(resume.latest, out, model, opt, data, state, main)
    start_step = state.step

    # --- logging: the config, metrics.jsonl (truncated to the resumed step), --report-to -----------------
    _log_start(cfg, model, data, objective, opt, dist_info)
    metrics = MetricsLog(out, state.step, cfg.report_backends, main, cfg.to_dict())

    # --- the loop --------------------------------------------------------------------------------------
    batches = batches_forever(data.loader)
    bar = _progress_bar(cfg, opt.total, state.step, main)
    state.window.started = time.time()  # the restored window's sums count, its time does not
    memory_mb(device)
    last: dict[str, Any] = {}
    while state.step < opt.total:
        state.window.add(step(student, opt, batches, objective, state, cfg, dist_info))
        state.step += 1
        bar.update(1)
        if state.step % cfg.log_every == 0 or state.step == opt.total:
            last = _log_window(state, opt, dist_info, t_start, metrics, bar)
        if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < opt.total:
            _evaluate(student, data, objective, cfg, dist_info, state.step, metrics, precision.autocast)
        if cfg.save_every and state.step % cfg.save_every == 0 and state.step < opt.total:
            _save(cfg, model, opt, data, state)
    bar.close()
    batches.close()  # stops the loader's prefetch thread / workers

    # --- the end: evaluate, checkpoint, save the final student ------------------------------------------
    ev: dict[str, float] = {}
    if state.step > start_step:
        ev = _evaluate(student, data, objective, cfg, dist_info, state.step, metrics, precision.autocast, final=True)
        _save(cfg, model, opt, data, state)
    if precision.final != precision.weights:  # --master-weights: the fp32 weights trained, OUT/final is bf16
        model.to(precision.final)
    final_dir = ckpt.save_final(out, model, tokenizer)
    metrics.close()
    elapsed = time.time() - t_start
    if run_dir is not None:  # rank 0
        _mark_finished(run_dir, cfg, state.step, opt.total, final_dir, elapsed)
    # Whatever holds the process group must go for cleanup() to free it (and join its threads) before the
    # interpreter exits: the DDP wrapper (its reducer) now; FSDP's state on `model` when train() returns,
    # collected by cleanup() at exit (see selkd.trainer.distributed).
    del student
    D.barrier()
    D.cleanup()
    return {"step": state.step, "total_steps": opt.total, "elapsed_s": elapsed, "final": str(final_dir), **last, **ev}


def step(
    student: nn.Module,
    opt: Optimization,
    batches: Iterator[Batch],
    objective: Objective,
    state: RankState,
    cfg: TrainConfig,
    dist_info: D.DistInfo,
) -> StepStats:
    """One optimizer step: ``--grad-accum`` micro-batches (forward, backward), the non-finite loss check,
    clipping, the optimizer and the scheduler. Returns this rank's statistics, still on the device.

    Host syncs: one per optimizer step, the non-finite check (:func:`_check_finite`), read after the last
    backward and before clipping. A non-finite loss of any micro-batch on any rank therefore stops the run
    at the step it happened, naming the step and the micro-batch's sequences, before its gradients reach
    the weights or the optimizer state (and before any checkpoint of that step). Losses, counts and the
    gradient norm are read only when a logging window is written (:meth:`Window.read`)."""
    device = dist_info.device
    autocast_dtype = opt.precision.autocast
    ddp = isinstance(student, nn.parallel.DistributedDataParallel)
    sums = torch.zeros(len(WINDOW_KEYS), dtype=torch.float64, device=device)
    micro_losses = torch.zeros(cfg.grad_accum, dtype=torch.float32, device=device)
    seq_ids: list[torch.Tensor] = []  # each micro-batch's sequence ids, on the host (read only to report a failure)
    opt.optimizer.zero_grad(set_to_none=True)
    for micro in range(cfg.grad_accum):
        batch = next(batches)
        seq_ids.append(batch.seq_index)
        batch = batch.to(device, non_blocking=True)
        sync = micro == cfg.grad_accum - 1 or not ddp
        with (
            student.no_sync() if not sync else nullcontext(),  # type: ignore[operator]
            torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None),
        ):
            res: StepOutput = student(
                *batch.student_inputs(),
                objective,
                state.policy_state,
                step=state.step,
                generator=state.generator,
                doc_start=batch.doc_start,
            )
            (res.loss / cfg.grad_accum).backward()
        micro_losses[micro] = res.loss.detach()
        means = torch.stack([res.loss.detach(), res.kd, res.ce]).double() / cfg.grad_accum
        counts = torch.stack([res.n_selected, res.n_valid, batch.attention_mask.sum()]).double()
        sums += torch.cat([means, counts])
    _check_finite(micro_losses, seq_ids, state.step + 1, dist_info)
    params = [p for group in opt.optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
    full_norm = getattr(grad_norm, "full_tensor", None)  # FSDP2: a DTensor
    grad_norm = full_norm() if callable(full_norm) else grad_norm
    opt.optimizer.step()
    opt.scheduler.step()
    return StepStats(sums, grad_norm)


def _check_finite(losses: torch.Tensor, seq_ids: list[torch.Tensor], at: int, dist_info: D.DistInfo) -> None:
    """Stop at the first non-finite loss on any rank, naming step ``at`` and this rank's sequences.
    ``losses``: [grad_accum] this rank's micro-batch losses of the step (on the device); ``seq_ids``: each
    micro-batch's sequence ids (host). The flags of every micro-batch (and, under torchrun, every rank: one
    small all-reduce) are summed on the device, so the step's one host read is a single number."""
    bad = (~torch.isfinite(losses)).float()
    total = bad.sum()
    if (D.all_reduce_sum(total) if dist_info.distributed else total).item() == 0:
        return
    flags = bad.tolist()  # the run stops: reads cost nothing any more
    if not any(flags):
        raise TrainError(f"non-finite loss at step {at} on another rank (see its message); lower --lr")
    micro = flags.index(1.0)
    raise TrainError(
        f"non-finite loss ({losses[micro].item()}) at step {at}; batch sequence ids {seq_ids[micro].tolist()}; "
        "lower --lr or check these sequences of the cache and the student's weights"
    )


# --------------------------------------------------------------------------- the loop's helpers


def memory_mb(device: torch.device) -> float:
    """Peak memory since the last call, in MiB: CUDA max allocated, or on CPU the process's peak RSS
    (Linux ``VmHWM``, reset after reading through ``/proc/self/clear_refs``; where that is not possible,
    the peak since the process started)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
                with suppress(OSError):
                    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
                return peak
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batches_forever(loader: Any) -> Iterator[Batch]:
    """The loader's batches across epochs (its cursor moves to the next epoch by itself)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise TrainError("the training split yields no batch: fewer sequences than --batch-size x ranks")


def rewind(source: Any) -> None:
    """Start an unshuffled evaluation stream from its first batch: a new epoch of an unshuffled stream
    is the same sequences in the same order (a plain ``set_epoch(0)`` would keep a cursor left in the
    middle by an evaluation cut short by ``--eval-batches``)."""
    source.set_epoch(int(source.state_dict()["epoch"]) + 1)


def eval_summary(ev: dict[str, float]) -> str:
    """The evaluation metrics for a log line, by their ``metrics.jsonl`` names without ``eval_``."""
    return " ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in ev.items() if k != "eval_positions")


def _already_finished(out: Path, finished: dict[str, Any], main: bool) -> dict[str, Any]:
    """A rerun of a run that finished and kept no checkpoint: say so, train nothing."""
    final_dir = out / ckpt.FINAL_DIR
    if main:
        step = f"{finished['step']} of {finished['total_steps']} steps"
        log(f"the run is already complete ({step}); {describe_kept(final_dir, [])}")
    D.barrier()
    D.cleanup()
    return {"step": finished["step"], "total_steps": finished["total_steps"], "final": str(final_dir)}


def _mark_finished(run_dir: RunDir, cfg: TrainConfig, step: int, total: int, final_dir: Path, elapsed: float) -> None:
    """The run is finished: record it and keep ``--keep-checkpoints`` of its checkpoints."""
    run_dir.mark_finished(step, total)
    kept = ckpt.prune_checkpoints(cfg.out, cfg.keep_checkpoints)
    log(f"done: {step} steps in {elapsed:.1f} s; {describe_kept(final_dir, kept)}")


def _log_start(
    cfg: TrainConfig, model: nn.Module, data: Data, objective: Objective, opt: Optimization, dist_info: D.DistInfo
) -> None:
    """Rank 0: write ``OUT/config.json`` and say what runs (the options, the student, the targets, the
    steps, the device and, with a held-out split, what its divergences are)."""
    if not dist_info.is_main:
        return
    (Path(cfg.out) / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))
    log("config: " + json.dumps(cfg.to_dict(), sort_keys=True))
    n_params = sum(p.numel() for p in model.parameters())
    ranks = f", {dist_info.world_size} ranks" if dist_info.distributed else ""
    log(
        f"student {cfg.student or cfg.student_config} ({n_params / 1e6:.2f}M params, vocab {vocab_size(model):,}, "
        f"{opt.precision.describe()}); "
        f"targets {data.mode} at temperature {data.temperature:g}; {opt.steps_per_epoch} steps per epoch; "
        f"{opt.total} steps; device {dist_info.device}{ranks}"
    )
    if data.eval_source is not None:
        divergences = eval_divergences(objective, data.mode)
        log("eval divergences: " + "; ".join(f"{k}: {v}" for k, v in divergences.items()))


def _progress_bar(cfg: TrainConfig, total: int, initial: int, main: bool) -> tqdm:
    return tqdm(
        total=total,
        initial=initial,
        unit="step",
        desc="selkd-train",
        disable=not (cfg.progress and main),
        dynamic_ncols=True,
        mininterval=1.0,
    )


def _log_window(
    state: RankState, opt: Optimization, dist_info: D.DistInfo, t_start: float, metrics: MetricsLog, bar: tqdm
) -> dict[str, Any]:
    """Write the logging window's row (global values: losses averaged over ranks, counts summed; a
    collective) and start the next window. Returns the row."""
    window = state.window
    sums = window.read()
    dt = max(time.time() - window.started, 1e-9)
    n = max(window.steps, 1) * dist_info.world_size
    row = {
        "step": state.step,
        "loss": sums["loss"] / n,
        "kd": sums["kd"] / n,
        "ce": sums["ce"] / n,
        "lr": opt.scheduler.get_last_lr()[0],
        "grad_norm": sums["grad_norm"],
        "selected_fraction": sums["selected"] / max(1, sums["valid"]),
        "tokens_per_s": sums["tokens"] / dt,
        "step_time_s": dt / max(window.steps, 1),
        "peak_memory_mb": memory_mb(dist_info.device),
        "elapsed_s": time.time() - t_start,
    }
    metrics.write(row)
    bar.set_postfix(
        loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:,.0f}", sel=f"{row['selected_fraction']:.2f}"
    )
    window.reset()
    return row


def _evaluate(
    student: nn.Module,
    data: Data,
    objective: Objective,
    cfg: TrainConfig,
    dist_info: D.DistInfo,
    at: int,
    metrics: MetricsLog,
    autocast: torch.dtype | None,
    final: bool = False,
) -> dict[str, float]:
    """Held-out statistics of the student at step ``at`` (every rank computes them: FSDP needs all
    ranks), computed under ``autocast`` as the training step is, written as an eval row and logged (as
    the ``final`` one, or step ``at``'s). Returns them ({} without a held-out split)."""
    if data.eval_source is None:
        return {}
    rewind(data.eval_source)
    inner = student.module if isinstance(student, nn.parallel.DistributedDataParallel) else student
    device = dist_info.device
    ev = evaluate(inner, data.eval_source, objective, device, autocast, cfg.eval_batches)
    if ev:
        metrics.write({"step": at, "eval": True, **ev})
        label = "final eval:" if final else f"step {at}: eval"
        log(f"{label} {eval_summary(ev)}", dist_info.is_main)
    return ev


def _save(cfg: TrainConfig, model: nn.Module, opt: Optimization, data: Data, state: RankState) -> None:
    """A checkpoint of step ``state.step`` (a collective: every rank calls it)."""
    ckpt.save_checkpoint(
        cfg.out,
        state.step,
        model,
        opt.optimizer,
        opt.scheduler,
        data.loader.state_dict(),
        cfg.to_dict(),
        {"total_steps": opt.total},
        keep=max(1, cfg.keep_checkpoints),  # one at least while training, to resume from
        rank_state=state.state_dict(),
    )

"""train(cfg): the whole distillation run, one flat loop from top to bottom.

The sections of :func:`train` run in order: distributed setup and seeds; the resume check (a
checkpoint in ``--out`` must come from the same config); the student; the data (cache or online
teacher); objective, wrapper, optimizer and schedule; restoring a checkpoint; logging setup; the loop
(step, logging, evaluation, checkpoint); the end (final evaluation, checkpoint, ``OUT/final``).

Resuming and ``metrics.jsonl``
------------------------------
A rerun with the same ``--out`` continues from the newest complete checkpoint (weights, optimizer,
scheduler, data-loader cursor, RNG states, the selection policy's state and this rank's partial
logging window), so on CPU the resumed run logs the same losses as an uninterrupted one.
``metrics.jsonl`` is then **truncated to the resumed step**: rows with ``step`` greater than the
checkpoint's step (written after the checkpoint by the interrupted run, and redone now) are dropped,
as is a line torn by a kill; a fresh start (no checkpoint) drops every row. So the file always holds
each step's row once, in order, as if the run had never stopped (only the timing fields of the first
row after a resume are approximate: its window's time restarts with the process).

``--steps`` (or ``--epochs``) may be raised on a rerun: the run continues to the new total and the
learning-rate schedule follows it from the resumed step on (the log says so). Lowering it, or changing
any option outside :data:`selkd.trainer.config.RESUME_MUTABLE`, is refused naming the keys. A rerun of
a finished run trains nothing and only re-saves ``OUT/final`` (or, when ``--keep-checkpoints 0`` left
no checkpoint, only says that the run is complete).

Which directories ``--out`` may name, and what a failed run leaves there, is :mod:`selkd.trainer.run_dir`'s
business: a new or empty directory or a selkd-train run, never one of the run's inputs; a run that fails
before its first complete checkpoint removes what it created.

Distributed runs log global values: the losses are the mean over ranks, counts and tokens the sum
(``peak_memory_mb`` is rank 0's).
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from selkd.cache import open_cache
from selkd.cache.prepare import corpus_tokens
from selkd.cache.teacher import load_causal_lm, load_tokenizer, same_tokenizer, tokenizer_fingerprint, vocab_size
from selkd.cache.tokens import CACHE_TOKENS_PREFIX
from selkd.trainer import checkpoint as ckpt
from selkd.trainer import distributed as D
from selkd.trainer.batch import Batch
from selkd.trainer.config import TrainConfig, config_differences
from selkd.trainer.data import CacheStream
from selkd.trainer.loader import make_loader
from selkd.trainer.online import OnlineStream, OnlineTeacher
from selkd.trainer.run_dir import CONFIG_FILE, OutError, RunDir, claim, describe_kept
from selkd.trainer.selection import make_policy_state
from selkd.trainer.student import Objective, SelectiveStudent, StepOutput, eval_divergences, evaluate

__all__ = ["METRICS_FILE", "TrainError", "lr_lambda", "train", "truncate_metrics"]

METRICS_FILE = "metrics.jsonl"
# Sums a logging window accumulates (per rank; all-reduced when a row is written).
WINDOW_KEYS = ("loss", "kd", "ce", "selected", "valid", "tokens")


class TrainError(Exception):
    """A user-facing training failure: names the thing and what to do."""


def log(msg: str, main: bool = True) -> None:
    """One ``selkd-train: ...`` line on stderr (only where ``main``)."""
    if main:
        print(f"selkd-train: {msg}", file=sys.stderr, flush=True)


def lr_lambda(total: int, warmup: int, schedule: str, min_ratio: float) -> Callable[[int], float]:
    """The LR multiplier for step index ``step`` (0-based): linear warm-up over ``warmup`` steps, then
    ``cosine`` or ``linear`` decay to ``min_ratio`` at ``total``, or ``constant``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * decay

    return f


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


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the rows of ``metrics.jsonl`` whose ``step`` is at most ``step`` (the resumed step; 0 for a
    fresh start) and drop the rest, including unparsable lines (a row torn by a kill). The file is
    rewritten atomically. Returns the number of lines dropped."""
    if not path.is_file():
        return 0
    kept: list[str] = []
    dropped = 0
    for line in path.read_text().splitlines():
        try:
            keep = int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, path)
    return dropped


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


def claim_out(cfg: TrainConfig, main: bool) -> RunDir | None:
    """Rank 0 checks, creates and marks ``--out`` (:func:`selkd.trainer.run_dir.claim`); every rank
    raises together when it cannot be used. Returns the run directory on rank 0, None elsewhere."""
    run_dir, error = None, None
    if main:
        try:
            run_dir = claim(cfg)
        except OutError as err:
            error = str(err)
    error = D.broadcast_object(error)
    if error is not None:
        raise OutError(error)
    return run_dir


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


def finished_problem(cfg: TrainConfig, out: Path, saved: dict[str, Any], finished: dict[str, Any]) -> str | None:
    """What stops a rerun of a run that finished and kept no checkpoint (``--keep-checkpoints 0``) from
    just saying it is complete, given the options it was run with (``saved``); None: nothing."""
    if (saved.get("steps"), saved.get("epochs")) != (cfg.steps, cfg.epochs):
        return (
            f"{out}: the run finished at step {finished['step']} and kept no checkpoint (--keep-checkpoints 0), "
            "so it cannot train on with other --steps/--epochs; use a new --out"
        )
    if not (out / ckpt.FINAL_DIR / CONFIG_FILE).is_file():
        return (
            f"{out}: the run finished, but {out / ckpt.FINAL_DIR} is gone and no checkpoint was kept to write it "
            "again; use a new --out"
        )
    return None


def _train(cfg: TrainConfig, dist_info: D.DistInfo, run_dir: RunDir | None, t_start: float) -> dict[str, Any]:
    """:func:`train` once ``--out`` is claimed (``run_dir``: rank 0's, None on the other ranks)."""
    main = dist_info.is_main
    device = dist_info.device
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    autocast_dtype = cfg.autocast_dtype(device.type)

    # --- resume check: a checkpoint in --out must come from the same config ---------------------
    # Rank 0 decides (only it needs to see OUT) and every rank gets the answer, so all raise together.
    # A finished run that kept no checkpoint is compared with its config.json instead.
    found: tuple[str | None, list[str], dict[str, Any] | None, str | None] = (None, [], None, None)
    if main:
        assert run_dir is not None
        ckpt.clean_incomplete(out)  # half-written checkpoints of a killed run
        latest_path = ckpt.latest_checkpoint(out)
        finished = run_dir.record().get("finished")
        if latest_path is not None:
            saved_cfg = json.loads((latest_path / ckpt.CONFIG_FILE).read_text())
            found = (str(latest_path), config_differences(saved_cfg, cfg), None, None)
        elif finished:
            saved = run_dir.saved_config() or {}
            found = (None, config_differences(saved, cfg), finished, finished_problem(cfg, out, saved, finished))
    latest_str, diffs, finished, problem = D.broadcast_object(found)
    latest = Path(latest_str) if latest_str is not None else None
    if diffs:
        what = (
            f"a checkpoint of another configuration ({latest.name})"
            if latest
            else "a finished run of another configuration (it kept no checkpoint)"
        )
        raise TrainError(
            f"{out} holds {what}; use a new --out or the saved options (only --steps/--epochs may be raised). "
            "Differences (saved -> now):\n  " + "\n  ".join(diffs)
        )
    if problem is not None:
        raise TrainError(problem)
    if latest is None and finished:
        final_dir = out / ckpt.FINAL_DIR
        if main:
            step = f"{finished['step']} of {finished['total_steps']} steps"
            log(f"the run is already complete ({step}); {describe_kept(final_dir, [])}")
        D.barrier()
        D.cleanup()
        return {"step": finished["step"], "total_steps": finished["total_steps"], "final": str(final_dir)}
    if cfg.resume and latest is None:
        raise TrainError(f"--resume: no complete checkpoint in {out / ckpt.CHECKPOINTS_DIR}")

    # --- the student's tokenizer, checked against the cache's before any weights are loaded -----------
    student_src = cfg.student or cfg.student_config
    tokenizer = load_tokenizer(student_src, trust_remote_code=cfg.trust_remote_code)  # type: ignore[arg-type]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    reader = None
    if cfg.cache is not None:
        reader = open_cache(cfg.cache, cfg.storage_option or None, require_complete=False)
        missing = reader.missing_parts
        if missing and not cfg.allow_missing_parts:
            raise TrainError(
                f"{cfg.cache}: incomplete cache: {len(missing)} of {reader.expected_parts} parts are not committed "
                f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); finish it by rerunning its "
                "`selkd-cache build` command, or train on the committed parts with --allow-missing-parts"
            )
        if not same_tokenizer(reader.header["tokenizer_fingerprint"], tokenizer):
            raise TrainError(
                f"the student's tokenizer ({student_src}) differs from the one the cache {cfg.cache} was built "
                "with (fingerprints differ); use a student that shares the teacher's tokenizer"
            )

    # --- the student -------------------------------------------------------------------------------
    if cfg.student is not None:
        model = load_causal_lm(cfg.student, device, torch.float32, cfg.trust_remote_code, frozen=False)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(cfg.student_config, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code).to(device)
    model.train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    student_vocab = vocab_size(model)

    # --- data: the cache (offline) or the teacher in the loop (online) ------------------------------
    teacher_generator: torch.Generator | None = None
    if reader is not None:
        header = reader.header
        teacher_vocab = int(header["vocab_size"])
        mode, temperature = header["classes"]["mode"], float(header["temperature"])

        def stream(split: str, train: bool) -> CacheStream:
            try:
                return CacheStream(
                    cfg.cache,  # type: ignore[arg-type]
                    split=split,
                    batch_size=cfg.batch_size,
                    seed=cfg.seed,
                    rank=dist_info.rank if train else 0,
                    world_size=dist_info.world_size if train else 1,
                    storage_options=cfg.storage_option or None,
                    sample_ratio=cfg.sample_ratio if train else None,
                    allow_missing_parts=cfg.allow_missing_parts,
                    pad_id=pad_id,
                    shuffle=train,
                    drop_last=train,
                )
            except ValueError as err:  # e.g. --sample-ratio on a cache without sample scores
                raise TrainError(str(err)) from err

        train_stream = stream("train", True)
        loader: Any = make_loader(train_stream, cfg.num_workers, cfg.prefetch, pin_memory=device.type == "cuda")
        batches_per_epoch = train_stream.steps_per_epoch()
        eval_source: Any = stream("eval", False) if reader.num_sequences("eval") else None
    else:
        teacher_tok = load_tokenizer(cfg.teacher, trust_remote_code=cfg.trust_remote_code)  # type: ignore[arg-type]
        if tokenizer_fingerprint(teacher_tok) != tokenizer_fingerprint(tokenizer):
            raise TrainError(f"the student's tokenizer ({student_src}) differs from the teacher's ({cfg.teacher})")
        teacher_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        teacher = load_causal_lm(cfg.teacher, device, teacher_dtype, cfg.trust_remote_code)  # type: ignore[arg-type]
        teacher_vocab = vocab_size(teacher)
        spec = cfg.class_spec
        assert spec is not None and cfg.temperature is not None and cfg.eval_fraction is not None
        try:
            spec.check_vocab(teacher_vocab)
        except ValueError as err:
            raise TrainError(str(err)) from err
        mode, temperature = spec.mode, cfg.temperature
        corpus = corpus_tokens(  # every rank tokenizes its share into OUT/tokens (or opens --tokens)
            tokens=cfg.tokens,
            data=cfg.data,
            prepare_into=str(out / CACHE_TOKENS_PREFIX),
            tokenizer=teacher_tok,
            tokenizer_name=cfg.teacher,  # type: ignore[arg-type]
            text_field=cfg.text_field,
            limit_tokens=cfg.limit_tokens,
            storage_options=cfg.storage_option,
            rank=dist_info.rank,
            world=dist_info.world_size,
            progress=cfg.progress and main,
        ).packed(cfg.max_seq_len or 512)
        live = OnlineTeacher(teacher, spec, temperature, seed=cfg.seed + dist_info.rank)
        teacher_generator = live.generator  # sample:N draws; checkpointed with the rank's state
        common = dict(
            eval_fraction=cfg.eval_fraction,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            split_seed=cfg.split_seed,
            pad_id=pad_id,
        )
        loader = OnlineStream(
            corpus, live, split="train", rank=dist_info.rank, world_size=dist_info.world_size, **common
        )  # type: ignore[arg-type]
        eval_source = OnlineStream(corpus, live, split="eval", shuffle=False, drop_last=False, **common)  # type: ignore[arg-type]
        eval_source = eval_source if eval_source.num_sequences else None
        batches_per_epoch = loader.steps_per_epoch()
    if student_vocab < teacher_vocab:
        raise TrainError(
            f"the student's vocabulary ({student_vocab:,}) is smaller than the teacher's ({teacher_vocab:,}): "
            "its LM head cannot represent every teacher class; use a student with at least as many"
        )
    if mode == "sample" and cfg.loss != "fkl":
        raise TrainError(f"--loss {cfg.loss} is not defined on sampled targets (the cache holds sample:N); use fkl")
    if mode == "sample" and cfg.select_signal == "reverse-kl":
        raise TrainError("--select reverse-kl needs topk or full targets; the cache holds sample:N")
    if mode != "topk" and cfg.topk_renormalize:
        raise TrainError(f"--topk-renormalize needs topk targets; the cache holds {mode} targets")

    # --- the objective, the wrapped student, optimizer and schedule ----------------------------------
    objective = Objective(
        signal=cfg.select_signal,
        fraction=cfg.select_fraction,
        policy=cfg.effective_policy,
        loss=cfg.loss,
        temperature=temperature,
        topk_renormalize=cfg.topk_renormalize,
        kd_weight=cfg.kd_weight,
        ce_weight=cfg.ce_weight,
        ce_on=cfg.ce_on,
        chunk=cfg.entropy_chunk,
    )
    try:
        wrapper = SelectiveStudent(model)
    except ValueError as err:  # an architecture whose post-head logits transform is not replicated
        raise TrainError(str(err)) from err
    student: nn.Module = D.wrap_model(wrapper, dist_info, fsdp=cfg.fsdp)
    ddp = isinstance(student, nn.parallel.DistributedDataParallel)
    eval_student = student.module if ddp else student
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
    )
    steps_per_epoch = batches_per_epoch // cfg.grad_accum
    total = cfg.total_steps(steps_per_epoch)
    warmup = cfg.resolved_warmup_steps(total)
    schedule = lr_lambda(total, warmup, cfg.schedule, cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    policy_state = make_policy_state(objective.policy, cfg.global_queue)
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + dist_info.rank)
    window: dict[str, float] = dict.fromkeys((*WINDOW_KEYS, "steps"), 0.0)

    # --- resume: weights, optimizer, schedule, data cursor, RNG, policy and logging window ---------------
    step = 0
    if latest is not None:
        state = ckpt.load_checkpoint(latest, model, optimizer, scheduler)
        step = state.step
        saved_total = int(state.extra.get("total_steps", total))
        if total < saved_total:
            raise TrainError(
                f"{latest} belongs to a run of {saved_total} steps; a rerun may raise --steps/--epochs but not "
                f"lower them (now {total} steps); use a new --out for a shorter run"
            )
        try:
            loader.load_state_dict(state.loader_state)
        except ValueError as err:
            raise TrainError(f"{latest}: {err}") from err
        rank_state = state.rank_state if isinstance(state.rank_state, dict) else {}
        if policy_state is not None and "policy" in rank_state:
            policy_state.load_state_dict(rank_state["policy"])
        if "generator" in rank_state:
            generator.set_state(rank_state["generator"])
        if teacher_generator is not None and "teacher_generator" in rank_state:
            teacher_generator.set_state(rank_state["teacher_generator"])
        if "window" in rank_state:
            window = {k: float(v) for k, v in rank_state["window"].items()}
        if total != saved_total:
            # The restored LambdaLR keeps its step count; its multiplier is now the new schedule's, and the
            # LR of the next step (set by the old schedule at the end of the last one) is recomputed.
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base * schedule(scheduler.last_epoch)
            log(
                f"training longer: {saved_total} -> {total} steps (--steps/--epochs raised); the learning-rate "
                f"schedule now follows the new total of {total} steps from step {step}",
                main,
            )
        log(f"resumed from {latest} at step {step} of {total}", main)
        if step >= total:
            log(f"the run is already complete ({step} of {total} steps); only re-saving {out / ckpt.FINAL_DIR}", main)
    start_step = step

    # --- logging: the config, metrics.jsonl (truncated to the resumed step), TensorBoard -------------------
    metrics_path = out / METRICS_FILE
    metrics_file = None
    if main:
        (out / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))
        log("config: " + json.dumps(cfg.to_dict(), sort_keys=True), main)
        n_params = sum(p.numel() for p in model.parameters())
        log(
            f"student {student_src} ({n_params / 1e6:.2f}M params, vocab {student_vocab:,}); targets {mode} at "
            f"temperature {temperature:g}; {steps_per_epoch} steps per epoch; {total} steps; device {device}"
            f"{f', {dist_info.world_size} ranks' if dist_info.distributed else ''}",
            main,
        )
        if eval_source is not None:
            divergences = eval_divergences(objective, mode)
            log("eval divergences: " + "; ".join(f"{k}: {v}" for k, v in divergences.items()), main)
        dropped = truncate_metrics(metrics_path, step)
        if dropped:
            log(f"{metrics_path}: dropped {dropped} row(s) after step {step} (those steps are redone)", main)
        metrics_file = metrics_path.open("a")
    tb = None
    if cfg.tensorboard and main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            log("--tensorboard: tensorboard is not installed (pip install selkd[tensorboard]); skipping", main)

    def write_metrics(row: dict[str, Any]) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
        if tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    tb.add_scalar(("eval/" if row.get("eval") else "train/") + k, v, row["step"])

    def run_eval() -> dict[str, float]:
        """Held-out statistics of the student (every rank computes them: FSDP needs all ranks)."""
        if eval_source is None:
            return {}
        rewind(eval_source)
        return evaluate(eval_student, eval_source, objective, device, autocast_dtype, cfg.eval_batches)

    def save(at: int) -> None:
        rank_state: dict[str, Any] = {"generator": generator.get_state(), "window": dict(window)}
        if policy_state is not None:
            rank_state["policy"] = policy_state.state_dict()
        if teacher_generator is not None:
            rank_state["teacher_generator"] = teacher_generator.get_state()
        ckpt.save_checkpoint(
            out,
            at,
            model,
            optimizer,
            scheduler,
            loader.state_dict(),
            cfg.to_dict(),
            {"total_steps": total},
            keep=max(1, cfg.keep_checkpoints),  # one at least while training, to resume from
            rank_state=rank_state,
        )

    # --- the loop ---------------------------------------------------------------------------------------
    batches = batches_forever(loader)
    bar = tqdm(
        total=total,
        initial=step,
        unit="step",
        desc="selkd-train",
        disable=not (cfg.progress and main),
        dynamic_ncols=True,
        mininterval=1.0,
    )
    t_window = time.time()
    memory_mb(device)
    last: dict[str, Any] = {}
    while step < total:
        optimizer.zero_grad(set_to_none=True)
        for micro in range(cfg.grad_accum):
            batch = next(batches).to(device, non_blocking=True)
            sync = micro == cfg.grad_accum - 1 or not ddp
            with (
                student.no_sync() if not sync else nullcontext(),  # type: ignore[operator]
                torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None),
            ):
                res: StepOutput = student(
                    *batch.student_inputs(),
                    objective,
                    policy_state,
                    progress=step / max(1, total),
                    generator=generator,
                )
                bad = (~torch.isfinite(res.loss.detach())).float()
                if (D.all_reduce_sum(bad) if dist_info.distributed else bad).item() > 0:
                    where = (
                        f"batch sequence ids {batch.seq_index.tolist()}"
                        if bad.item()
                        else "on another rank (see its message)"
                    )
                    raise TrainError(
                        f"non-finite loss ({res.loss.item()}) at step {step + 1}; {where}; lower --lr or check "
                        "these sequences of the cache and the student's weights"
                    )
                (res.loss / cfg.grad_accum).backward()
            window["loss"] += res.loss.item() / cfg.grad_accum
            window["kd"] += res.kd.item() / cfg.grad_accum
            window["ce"] += res.ce.item() / cfg.grad_accum
            window["selected"] += res.n_selected
            window["valid"] += res.n_valid
            window["tokens"] += batch.num_tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
        full_norm = getattr(grad_norm, "full_tensor", None)  # FSDP2: a DTensor
        grad_norm = full_norm() if callable(full_norm) else grad_norm
        optimizer.step()
        scheduler.step()
        step += 1
        window["steps"] += 1
        bar.update(1)

        # --- logging: global values (losses averaged over ranks, counts summed) ---
        if step % cfg.log_every == 0 or step == total:
            local = torch.tensor([window[k] for k in WINDOW_KEYS], dtype=torch.float64, device=device)
            sums = dict(zip(WINDOW_KEYS, D.all_reduce_sum(local).tolist()))
            dt = max(time.time() - t_window, 1e-9)
            n = max(window["steps"], 1) * dist_info.world_size
            row = {
                "step": step,
                "loss": sums["loss"] / n,
                "kd": sums["kd"] / n,
                "ce": sums["ce"] / n,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "selected_fraction": sums["selected"] / max(1, sums["valid"]),
                "tokens_per_s": sums["tokens"] / dt,
                "step_time_s": dt / max(window["steps"], 1),
                "peak_memory_mb": memory_mb(device),
                "elapsed_s": time.time() - t_start,
            }
            write_metrics(row)
            bar.set_postfix(
                loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:,.0f}", sel=f"{row['selected_fraction']:.2f}"
            )
            last = row
            window = dict.fromkeys(window, 0.0)
            t_window = time.time()

        # --- evaluation and checkpoint (both also run at the end, below) ---
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            ev = run_eval()
            if ev:
                write_metrics({"step": step, "eval": True, **ev})
                log(f"step {step}: eval {eval_summary(ev)}", main)
        if cfg.save_every and step % cfg.save_every == 0 and step < total:
            save(step)
    bar.close()
    batches.close()  # stops the loader's prefetch thread / workers

    # --- the end: evaluate, checkpoint, save the final student ---------------------------------------------
    ev: dict[str, float] = {}
    if step > start_step:
        ev = run_eval()
        if ev:
            write_metrics({"step": step, "eval": True, **ev})
            log(f"final eval: {eval_summary(ev)}", main)
        save(step)
    final_dir = ckpt.save_final(out, model, tokenizer)
    if metrics_file is not None:
        metrics_file.close()
    if tb is not None:
        tb.close()
    elapsed = time.time() - t_start
    if run_dir is not None:  # rank 0: the run is finished; keep --keep-checkpoints of its checkpoints
        run_dir.mark_finished(step, total)
        kept = ckpt.prune_checkpoints(out, cfg.keep_checkpoints)
        log(f"done: {step} steps in {elapsed:.1f} s; {describe_kept(final_dir, kept)}", main)
    # Drop the DDP wrapper (its reducer holds the process group) before destroying the group: destroying
    # the group first leaves gloo's destructor waiting forever at exit.
    del student
    if dist_info.distributed:
        gc.collect()
    D.barrier()
    D.cleanup()
    return {"step": step, "total_steps": total, "elapsed_s": elapsed, "final": str(final_dir), **last, **ev}

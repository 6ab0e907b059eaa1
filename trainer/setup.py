"""The pieces a training run is made of, one setup function each (as torchtune's recipes' ``_setup_*``).

In the order :func:`selkd.trainer.loop.train` calls them: :func:`claim_out` and :func:`check_resume`
(``--out``: a checkpoint there must come from the same config), :func:`setup_tokenizer` (checked
against the cache's before any weights load), :func:`resolve_precision` (the dtypes) and
:func:`setup_student`, then :mod:`selkd.trainer.setup_data` (the cache, or the teacher in the loop, and
the student's fit to the targets), :func:`setup_objective`, :func:`setup_optimizer` (AdamW and the LR
schedule), :class:`RankState` (what each rank carries from step to step) and :func:`restore`
(everything a checkpoint holds).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import nn

from selkd.cache import open_cache
from selkd.cache.doc_attention import check_separates
from selkd.cache.errors import SelkdError
from selkd.cache.fingerprints import same_tokenizer
from selkd.cache.reader import CacheReader
from selkd.cache.teacher import DTYPE_NAMES, checkpoint_dtype, load_causal_lm, load_tokenizer
from selkd.trainer import checkpoint as ckpt
from selkd.trainer import distributed as D
from selkd.trainer.config import TrainConfig, config_differences
from selkd.trainer.head import check_selective_head
from selkd.trainer.metrics import Window, log
from selkd.trainer.run_dir import CONFIG_FILE, OutError, RunDir, claim
from selkd.trainer.selection import GlobalQueue, make_policy_state
from selkd.trainer.student import Objective, SelectiveStudent

if TYPE_CHECKING:
    from selkd.trainer.setup_data import Data

__all__ = [
    "PROBE_TEXT",
    "Optimization",
    "Precision",
    "RankState",
    "Resume",
    "TrainError",
    "check_resume",
    "claim_out",
    "lr_lambda",
    "resolve_precision",
    "restore",
    "seed_everything",
    "setup_objective",
    "setup_optimizer",
    "setup_student",
    "setup_tokenizer",
    "wrap_student",
]


class TrainError(SelkdError):
    """A user-facing training failure: names the thing and what to do."""


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs (a --student-config student is initialised from
    torch's)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- --out and the resume check


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


class Resume(NamedTuple):
    latest: Path | None  # the newest complete checkpoint in --out: resume from it
    finished: dict[str, Any] | None  # the run record's "finished" entry (step, total_steps), when it has one


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


def check_resume(cfg: TrainConfig, run_dir: RunDir | None) -> Resume:
    """What ``--out`` holds to go on from: a checkpoint of the same config, or a finished run of it that
    kept no checkpoint (compared with its config.json). Rank 0 (``run_dir`` not None) decides, since only
    it needs to see OUT, and every rank gets the answer, so all raise together."""
    out = Path(cfg.out)
    found: tuple[str | None, list[str], dict[str, Any] | None, str | None] = (None, [], None, None)
    if run_dir is not None:
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
    if cfg.resume and latest is None and not finished:
        raise TrainError(f"--resume: no complete checkpoint in {out / ckpt.CHECKPOINTS_DIR}")
    return Resume(latest, finished)


# --------------------------------------------------------------------------- the student


def setup_tokenizer(cfg: TrainConfig) -> tuple[Any, CacheReader | None]:
    """The student's tokenizer and, in cache mode, the cache, checked against each other (and --loss-on
    against the cache's) before any weights are loaded (an incomplete cache is refused unless
    ``--allow-missing-parts``)."""
    student_src = cfg.student or cfg.student_config
    tokenizer = load_tokenizer(student_src, trust_remote_code=cfg.trust_remote_code)  # type: ignore[arg-type]
    if cfg.cache is None:
        return tokenizer, None
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
    if cfg.loss_on is not None and cfg.loss_on != reader.loss_on:
        raise TrainError(
            f"--loss-on {cfg.loss_on}: {reader.url} was built with --loss-on {reader.loss_on}, which fixes the "
            "positions that train; leave --loss-on out or build another cache"
        )
    return tokenizer, reader


class Precision(NamedTuple):
    """The student's dtypes, resolved once from ``--dtype`` and ``--master-weights``."""

    weights: torch.dtype  # its parameters, so also AdamW's state and the checkpoints' weights
    autocast: torch.dtype | None  # the compute dtype under torch.autocast; None: the weights' own
    final: torch.dtype  # OUT/final's weights (and its config.json's dtype)

    def describe(self) -> str:
        """For the start-up log line, e.g. ``bfloat16 weights``."""
        name = {d: str(d).removeprefix("torch.") for d in (self.weights, self.autocast, self.final)}
        if self.autocast is None:
            return f"{name[self.weights]} weights"
        return f"{name[self.weights]} master weights, {name[self.autocast]} compute, {name[self.final]} OUT/final"


def resolve_precision(cfg: TrainConfig) -> Precision:
    """``--dtype`` (``auto``: the checkpoint's, bf16 when it declares bf16 and fp32 otherwise, an fp16
    checkpoint included: fp16 training needs loss scaling, which the trainer does not do). With
    ``--master-weights`` and bf16, the weights and AdamW's state are fp32 (checkpoints hold them, so a
    resume is exact), the computation bf16 under autocast, and only OUT/final is bf16."""
    if cfg.dtype != "auto":
        chosen = DTYPE_NAMES[cfg.dtype]
    else:
        declared = checkpoint_dtype(cfg.student or cfg.student_config, cfg.trust_remote_code)  # type: ignore[arg-type]
        chosen = torch.bfloat16 if declared == torch.bfloat16 else torch.float32
    if cfg.master_weights and chosen != torch.float32:
        return Precision(torch.float32, chosen, chosen)
    return Precision(chosen, None, chosen)


def setup_student(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The student in ``dtype`` (:attr:`Precision.weights`) and training mode: ``--student`` weights, or
    ``--student-config`` at random (initialised in float32 from the global torch RNG, so after the seeds
    are set, then cast)."""
    if cfg.student is not None:
        model = load_causal_lm(cfg.student, device, dtype, cfg.trust_remote_code, frozen=False)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(cfg.student_config, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code, dtype=torch.float32)
        model = model.to(device=device, dtype=dtype)
    model.train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


# --------------------------------------------------------------------------- objective and optimisation


def setup_objective(cfg: TrainConfig, temperature: float) -> Objective:
    """What each step optimises, from the options (its signal, policy and loss are looked up here)."""
    return Objective(
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
        importance_weights=cfg.importance_weights,
        curriculum_steps=cfg.curriculum_steps,
        random_share=cfg.select_spec.random_share,
    )


# Real text for the start-up check of the selective head: a few dozen tokens with any tokenizer.
PROBE_TEXT = "def mean(xs):\n    # the selective head gives what model(...).logits gives\n    return sum(xs) / len(xs)"


def wrap_student(
    model: nn.Module, cfg: TrainConfig, dist_info: D.DistInfo, tokenizer: Any, doc_attention: bool
) -> nn.Module:
    """The whole selective step as one module (:class:`SelectiveStudent`), wrapped in DDP or FSDP2 under
    torchrun. First the selective head is checked against ``model(...).logits`` on :data:`PROBE_TEXT`
    (:func:`selkd.trainer.head.check_selective_head`), so that an architecture whose forward changes the
    logits in a way :func:`selkd.cache.logits.logits_transform` does not know is refused here instead of
    trained on other logits. Its cost is one forward of a few dozen tokens (see docs/results.md). With
    ``doc_attention`` the student must also keep packed documents apart
    (:func:`selkd.cache.doc_attention.check_separates`, three forwards of at most 11 tokens)."""
    try:
        wrapper = SelectiveStudent(model, doc_attention)  # refuses the post-head transforms it cannot replicate
        ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"].to(dist_info.device)
        check_selective_head(model, ids, torch.ones_like(ids))
        if doc_attention:
            check_separates(model, f"the student {cfg.student or cfg.student_config}")
    except ValueError as err:
        raise TrainError(str(err)) from err
    return D.wrap_model(wrapper, dist_info, fsdp=cfg.fsdp)


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


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    schedule: Callable[[int], float]  # the scheduler's multiplier of step index (lr_lambda)
    total: int  # optimizer steps of the whole run
    steps_per_epoch: int  # optimizer steps per epoch (after --grad-accum)
    precision: Precision  # the weights' dtype (the optimizer's state follows it) and the compute dtype


def setup_optimizer(cfg: TrainConfig, model: nn.Module, batches_per_epoch: int, precision: Precision) -> Optimization:
    """AdamW over the student's parameters and the warm-up + decay schedule over the run's steps."""
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
    )
    steps_per_epoch = batches_per_epoch // cfg.grad_accum
    total = cfg.total_steps(steps_per_epoch)
    schedule = lr_lambda(total, cfg.resolved_warmup_steps(total), cfg.schedule, cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return Optimization(optimizer, scheduler, schedule, total, steps_per_epoch, precision)


# --------------------------------------------------------------------------- per-rank state and restore


@dataclass
class RankState:
    """What each rank carries from step to step besides weights, optimizer and data cursor; all of it is
    in every checkpoint (``rank-NNNNN.pt``), so a resumed run takes the same steps."""

    step: int  # optimizer steps done
    generator: torch.Generator  # the random signal's and the stochastic policy's draws
    policy_state: GlobalQueue | None  # the global policy's queue
    teacher_generator: torch.Generator | None  # online sample:N draws
    window: Window  # the logging window so far

    @classmethod
    def start(cls, cfg: TrainConfig, dist_info: D.DistInfo, objective: Objective, data: Data) -> RankState:
        generator = torch.Generator(device=dist_info.device).manual_seed(cfg.seed * 7919 + dist_info.rank)
        policy_state = make_policy_state(objective.policy, cfg.global_queue)
        return cls(0, generator, policy_state, data.teacher_generator, Window(dist_info.device))

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"generator": self.generator.get_state(), "window": self.window.state_dict()}
        if self.policy_state is not None:
            state["policy"] = self.policy_state.state_dict()
        if self.teacher_generator is not None:
            state["teacher_generator"] = self.teacher_generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint's rank state; what it lacks (a rank the saving run did not have) stays as it is."""
        if self.policy_state is not None and "policy" in state:
            self.policy_state.load_state_dict(state["policy"])
        if "generator" in state:
            self.generator.set_state(state["generator"])
        if self.teacher_generator is not None and "teacher_generator" in state:
            self.teacher_generator.set_state(state["teacher_generator"])
        if "window" in state:
            self.window.load_state_dict(state["window"])


def restore(
    latest: Path, out: Path, model: nn.Module, opt: Optimization, data: Data, state: RankState, main: bool
) -> None:
    """Resume from checkpoint ``latest`` (in ``out``): weights, optimizer, schedule, data cursor, RNG, the rank state.
    ``--steps``/``--epochs`` may have been raised (the schedule then follows the new total), not lowered."""
    saved = ckpt.load_checkpoint(latest, model, opt.optimizer, opt.scheduler)
    state.step = saved.step
    saved_total = int(saved.extra.get("total_steps", opt.total))
    if opt.total < saved_total:
        raise TrainError(
            f"{latest} belongs to a run of {saved_total} steps; a rerun may raise --steps/--epochs but not "
            f"lower them (now {opt.total} steps); use a new --out for a shorter run"
        )
    try:
        data.loader.load_state_dict(saved.loader_state)
    except ValueError as err:
        raise TrainError(f"{latest}: {err}") from err
    state.load_state_dict(saved.rank_state if isinstance(saved.rank_state, dict) else {})
    if opt.total != saved_total:
        # The restored LambdaLR keeps its step count; its multiplier is now the new schedule's, and the
        # LR of the next step (set by the old schedule at the end of the last one) is recomputed.
        for group, base in zip(opt.optimizer.param_groups, opt.scheduler.base_lrs):
            group["lr"] = base * opt.schedule(opt.scheduler.last_epoch)
        log(
            f"training longer: {saved_total} -> {opt.total} steps (--steps/--epochs raised); the learning-rate "
            f"schedule now follows the new total of {opt.total} steps from step {state.step}",
            main,
        )
    log(f"resumed from {latest} at step {state.step} of {opt.total}", main)
    if state.step >= opt.total:
        what = f"{state.step} of {opt.total} steps"
        log(f"the run is already complete ({what}); only re-saving {out / ckpt.FINAL_DIR}", main)

"""train(cfg): the whole distillation run, one flat loop from top to bottom."""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from selkd.cache import open_cache
from selkd.cache.corpus import load_corpus
from selkd.cache.teacher import load_causal_lm, load_tokenizer, tokenizer_fingerprint, vocab_size
from selkd.trainer import checkpoint as ckpt
from selkd.trainer import distributed as D
from selkd.trainer.config import TrainConfig, config_differences, steps_raised
from selkd.trainer.data import Batch, CacheStream, make_loader
from selkd.trainer.online import OnlineStream, OnlineTeacher
from selkd.trainer.selection import make_policy_state
from selkd.trainer.student import EvalSums, Objective, SelectiveStudent, StepOutput


class TrainError(Exception):
    """A user-facing training failure: names the thing and what to do."""


def log(msg: str, main: bool = True) -> None:
    if main:
        print(f"selkd-train: {msg}", file=sys.stderr, flush=True)


def lr_lambda(total: int, warmup: int, schedule: str, min_ratio: float):
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
    """Peak memory since the last call: CUDA max allocated, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
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


def train(cfg: TrainConfig) -> dict[str, Any]:
    t_start = time.time()
    # --- distributed, seeds, output directory ---------------------------------------------------
    dist_info = D.init_distributed(cfg.device)
    main = dist_info.is_main
    device = dist_info.device
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    autocast_dtype = cfg.autocast_dtype(device.type)

    # --- resume: the checkpoint in --out must come from the same config -------------------------
    latest = ckpt.latest_checkpoint(out)
    if cfg.resume and latest is None:
        raise TrainError(f"--resume: no complete checkpoint in {out / ckpt.CHECKPOINTS_DIR}")
    if latest is not None:
        saved_cfg = json.loads((latest / ckpt.CONFIG_FILE).read_text())
        diffs = config_differences(saved_cfg, cfg)
        if diffs:
            raise TrainError(
                f"{out} holds a checkpoint of another configuration ({latest.name}); use a new --out or the "
                "saved options. Differences (saved -> now):\n  " + "\n  ".join(diffs)
            )

    # --- student and its tokenizer ----------------------------------------------------------------
    student_src = cfg.student or cfg.student_config
    tokenizer = load_tokenizer(student_src, trust_remote_code=cfg.trust_remote_code)  # type: ignore[arg-type]
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
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    # --- data: the cache (offline) or the teacher in the loop (online) ------------------------------
    if cfg.cache is not None:
        reader = open_cache(cfg.cache, cfg.storage_option or None, require_complete=not cfg.allow_missing_parts)
        header = reader.header
        if header["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
            raise TrainError(
                f"the student's tokenizer ({student_src}) differs from the one the cache {cfg.cache} was built "
                "with (fingerprints differ); use a student that shares the teacher's tokenizer"
            )
        teacher_vocab = int(header["vocab_size"])
        mode, temperature = header["classes"]["mode"], float(header["temperature"])

        def stream(split: str, train: bool) -> CacheStream:
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
        spec.check_vocab(teacher_vocab)
        mode, temperature = spec.mode, cfg.temperature
        corpus = load_corpus(
            cfg.data,
            teacher_tok,
            cfg.max_seq_len or 512,
            cfg.text_field or "text",
            cfg.limit_tokens,
            progress=cfg.progress and main,
        )
        live = OnlineTeacher(teacher, spec, temperature, seed=cfg.seed + dist_info.rank)
        common = dict(eval_fraction=cfg.eval_fraction, batch_size=cfg.batch_size, seed=cfg.seed, pad_id=pad_id)
        loader = OnlineStream(
            corpus, live, split="train", rank=dist_info.rank, world_size=dist_info.world_size, **common
        )  # type: ignore[arg-type]
        eval_source = OnlineStream(corpus, live, split="eval", shuffle=False, drop_last=False, **common)  # type: ignore[arg-type]
        batches_per_epoch = loader.steps_per_epoch()
    if student_vocab < teacher_vocab:
        raise TrainError(
            f"the student's vocabulary ({student_vocab:,}) is smaller than the teacher's ({teacher_vocab:,}): "
            "its LM head cannot represent every teacher class; use a student with at least as many"
        )
    if mode == "sample" and cfg.loss != "fkl":
        raise TrainError(f"--loss {cfg.loss} is not defined on sampled targets (the cache holds sample:N); use fkl")

    # --- the objective, the wrapped student, optimizer and schedule ----------------------------------
    objective = Objective(
        signal=cfg.select_signal,
        fraction=cfg.select_fraction,
        policy=cfg.effective_policy,
        loss=cfg.loss,
        temperature=temperature,
        topk_renormalize=cfg.topk_renormalize,
        ce_weight=cfg.ce_weight,
        ce_on=cfg.ce_on,
        chunk=cfg.entropy_chunk,
    )
    wrapper = SelectiveStudent(model)
    student: nn.Module = D.wrap_model(wrapper, dist_info, fsdp=cfg.fsdp)
    eval_student = student.module if isinstance(student, nn.parallel.DistributedDataParallel) else student
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
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, warmup, cfg.schedule, cfg.min_lr_ratio))
    policy_state = make_policy_state(objective.policy, cfg.global_queue)
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + dist_info.rank)

    # --- resume ---------------------------------------------------------------------------------------
    step = 0
    if latest is not None:
        state = ckpt.load_checkpoint(latest, model, optimizer, scheduler)
        step = state.step
        loader.load_state_dict(state.loader_state)
        if policy_state is not None and isinstance(state.rank_state, dict) and "policy" in state.rank_state:
            policy_state.load_state_dict(state.rank_state["policy"])
        if isinstance(state.rank_state, dict) and "generator" in state.rank_state:
            generator.set_state(state.rank_state["generator"])
        if steps_raised(state.config, cfg):
            log(
                f"training longer: --steps {state.config.get('steps')} -> {cfg.steps}; the learning-rate schedule "
                f"now follows the new total of {total} steps",
                main,
            )
        log(f"resumed from {latest} at step {step}", main)
    if main:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        log("config: " + json.dumps(cfg.to_dict(), sort_keys=True), main)
        n_params = sum(p.numel() for p in model.parameters())
        log(
            f"student {student_src} ({n_params / 1e6:.2f}M params, vocab {student_vocab:,}); targets {mode} at "
            f"temperature {temperature:g}; {steps_per_epoch} steps per epoch; {total} steps; device {device}"
            f"{f', {dist_info.world_size} ranks' if dist_info.distributed else ''}",
            main,
        )
    metrics_file = (out / "metrics.jsonl").open("a") if main else None
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
        if eval_source is None:
            return {}
        eval_student.eval()
        sums = EvalSums(0.0, 0.0, 0.0, 0)
        with torch.no_grad():
            if hasattr(eval_source, "set_epoch"):
                eval_source.set_epoch(0)
            for i, batch in enumerate(eval_source):
                if cfg.eval_batches is not None and i >= cfg.eval_batches:
                    break
                b = batch.to(device)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    s = eval_student(
                        b.input_ids,
                        b.attention_mask,
                        b.labels,
                        b.valid,
                        b.targets,
                        b.teacher_entropy,
                        b.teacher_logprob,
                        objective,
                        evaluate=True,
                    )
                sums = EvalSums(sums.ce + s.ce, sums.kl + s.kl, sums.agree + s.agree, sums.n + s.n)
        eval_student.train()
        n = max(sums.n, 1)
        ce = sums.ce / n
        return {
            "eval_ce": ce,
            "eval_ppl": math.exp(min(ce, 50)),
            "eval_kl": sums.kl / n,
            "eval_top1_agree": sums.agree / n,
            "eval_positions": sums.n,
        }

    def save(at: int) -> None:
        rank_state: dict[str, Any] = {"generator": generator.get_state()}
        if policy_state is not None:
            rank_state["policy"] = policy_state.state_dict()
        ckpt.save_checkpoint(
            out,
            at,
            model,
            optimizer,
            scheduler,
            loader.state_dict(),
            cfg.to_dict(),
            {"total_steps": total},
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
    window = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "selected": 0, "valid": 0, "tokens": 0, "steps": 0}
    t_window = time.time()
    memory_mb(device)
    last: dict[str, Any] = {}
    while step < total:
        optimizer.zero_grad(set_to_none=True)
        for micro in range(cfg.grad_accum):
            batch = next(batches).to(device, non_blocking=True)
            sync = micro == cfg.grad_accum - 1 or not isinstance(student, nn.parallel.DistributedDataParallel)
            ctx = student.no_sync() if not sync else _nullcontext()  # type: ignore[operator]
            with ctx, torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                res: StepOutput = student(
                    batch.input_ids,
                    batch.attention_mask,
                    batch.labels,
                    batch.valid,
                    batch.targets,
                    batch.teacher_entropy,
                    batch.teacher_logprob,
                    objective,
                    policy_state,
                    progress=step / max(1, total),
                    generator=generator,
                )
                if not torch.isfinite(res.loss):
                    raise TrainError(
                        f"non-finite loss ({res.loss.item()}) at step {step + 1}; batch sequence ids "
                        f"{batch.seq_index.tolist()}; lower --lr or check these sequences of the cache"
                    )
                (res.loss / cfg.grad_accum).backward()
            window["loss"] += res.loss.item() / cfg.grad_accum
            window["kd"] += res.kd.item() / cfg.grad_accum
            window["ce"] += res.ce.item() / cfg.grad_accum
            window["selected"] += res.n_selected
            window["valid"] += res.n_valid
            window["tokens"] += batch.num_tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        step += 1
        window["steps"] += 1
        bar.update(1)

        # --- logging ---
        if step % cfg.log_every == 0 or step == total:
            dt = max(time.time() - t_window, 1e-9)
            n = window["steps"]
            row = {
                "step": step,
                "loss": window["loss"] / n,
                "kd": window["kd"] / n,
                "ce": window["ce"] / n,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "selected_fraction": window["selected"] / max(1, window["valid"]),
                "tokens_per_s": window["tokens"] * dist_info.world_size / dt,
                "step_time_s": dt / n,
                "peak_memory_mb": memory_mb(device),
                "elapsed_s": time.time() - t_start,
            }
            write_metrics(row)
            bar.set_postfix(
                loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:,.0f}", sel=f"{row['selected_fraction']:.2f}"
            )
            last = row
            window = dict.fromkeys(window, 0) | {"loss": 0.0, "kd": 0.0, "ce": 0.0}
            t_window = time.time()
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            ev = run_eval()
            if ev:
                write_metrics({"step": step, "eval": True, **ev})
                log(
                    f"step {step}: eval ce {ev['eval_ce']:.4f} ppl {ev['eval_ppl']:.2f} kl {ev['eval_kl']:.4f} "
                    f"top-1 agreement {ev['eval_top1_agree']:.3f}",
                    main,
                )
        if cfg.save_every and step % cfg.save_every == 0 and step < total:
            save(step)
    bar.close()

    # --- the end: evaluate, checkpoint, save the final student ---------------------------------------------
    ev = run_eval()
    if ev:
        write_metrics({"step": step, "eval": True, **ev})
        log(
            f"final eval: ce {ev['eval_ce']:.4f} ppl {ev['eval_ppl']:.2f} kl {ev['eval_kl']:.4f} "
            f"top-1 agreement {ev['eval_top1_agree']:.3f}",
            main,
        )
    save(step)
    final_dir = ckpt.save_final(out, model, tokenizer)
    if metrics_file is not None:
        metrics_file.close()
    if tb is not None:
        tb.close()
    elapsed = time.time() - t_start
    log(f"done: {step} steps in {elapsed:.1f} s; the student is in {final_dir}", main)
    D.cleanup()
    return {"step": step, "total_steps": total, "elapsed_s": elapsed, "final": str(final_dir), **last, **ev}


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None

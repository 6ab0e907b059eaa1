"""Where a run's batches come from (:func:`setup_data`, called by :func:`selkd.trainer.loop.train` after
:func:`selkd.trainer.setup.setup_student`): the cache's streams (offline), or the teacher in the loop over
``--data`` (online); and :func:`check_student_fits`, the student's head against the targets' classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selkd.cache.config import SETTINGS_BEFORE_OPTION
from selkd.cache.doc_attention import check_separates
from selkd.cache.fingerprints import tokenizer_fingerprint
from selkd.cache.prepare import corpus_tokens
from selkd.cache.reader import CacheReader
from selkd.cache.teacher import (
    DTYPE_NAMES,
    checkpoint_dtype,
    load_causal_lm,
    load_tokenizer,
    num_classes,
    vocab_size,
)
from selkd.cache.tokens import CACHE_TOKENS_PREFIX
from selkd.trainer import distributed as D
from selkd.trainer.config import TrainConfig
from selkd.trainer.data import CacheStream
from selkd.trainer.loader import make_loader
from selkd.trainer.metrics import log
from selkd.trainer.online import OnlineStream, OnlineTeacher
from selkd.trainer.setup import TrainError
from selkd.trainer.targets_check import check_targets


@dataclass
class Data:
    """Where batches come from and what their targets are."""

    loader: Any  # the training batches; its cursor is in every checkpoint
    eval_source: Any | None  # the held-out batches (unshuffled), None without a held-out split
    batches_per_epoch: int  # this rank's training batches per epoch
    mode: str  # the targets' mode: sample, topk or full
    temperature: float  # the teacher temperature of the targets
    num_classes: int  # C: what target ids index (the tokenizer's length; a cache's header_classes)
    teacher_generator: torch.Generator | None = None  # online sample:N draws; checkpointed per rank
    doc_attention: bool = True  # each packed document attends only to itself (the student; online: the teacher)


def setup_data(cfg: TrainConfig, dist_info: D.DistInfo, tokenizer: Any, reader: CacheReader | None) -> Data:
    """The cache's streams (offline) or the teacher in the loop over ``--data`` (online)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if reader is not None:
        return _cache_data(cfg, dist_info, reader, pad_id)
    return _online_data(cfg, dist_info, tokenizer, pad_id)


def _cache_data(cfg: TrainConfig, dist_info: D.DistInfo, reader: CacheReader, pad_id: int) -> Data:
    device = dist_info.device

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

    header = reader.header
    train_stream = stream("train", True)
    return Data(
        loader=make_loader(train_stream, cfg.num_workers, cfg.prefetch, pin_memory=device.type == "cuda"),
        eval_source=stream("eval", False) if reader.num_sequences("eval") else None,
        batches_per_epoch=train_stream.steps_per_epoch(),
        mode=header["classes"]["mode"],
        temperature=float(header["temperature"]),
        num_classes=reader.num_classes,
        doc_attention=_student_doc_attention(cfg, header, dist_info.is_main),
    )


def _student_doc_attention(cfg: TrainConfig, header: dict[str, Any], main: bool) -> bool:
    """Cache mode: the student keeps packed documents apart as the cache's teacher pass did, unless
    ``--doc-attention`` says otherwise. A different choice is allowed (the targets stay valid; only the
    context the student sees at a document's first tokens differs from the teacher's) and noted once."""
    cached = bool(header["settings"].get("doc_attention", SETTINGS_BEFORE_OPTION["doc_attention"]))
    if cfg.doc_attention is None or cfg.doc_attention == cached:
        return cached
    where = {True: "within each document only", False: "across document boundaries"}
    flag = "--doc-attention" if cfg.doc_attention else "--no-doc-attention"
    log(f"note: {flag}: the student attends {where[cfg.doc_attention]}, the cache's teacher {where[cached]}", main)
    return cfg.doc_attention


def _online_data(cfg: TrainConfig, dist_info: D.DistInfo, tokenizer: Any, pad_id: int) -> Data:
    device = dist_info.device
    teacher_tok = load_tokenizer(cfg.teacher, trust_remote_code=cfg.trust_remote_code)  # type: ignore[arg-type]
    if tokenizer_fingerprint(teacher_tok) != tokenizer_fingerprint(tokenizer):
        student_src = cfg.student or cfg.student_config
        raise TrainError(f"the student's tokenizer ({student_src}) differs from the teacher's ({cfg.teacher})")
    assert cfg.teacher is not None and cfg.teacher_dtype is not None
    teacher_dtype = DTYPE_NAMES.get(cfg.teacher_dtype) or checkpoint_dtype(cfg.teacher, cfg.trust_remote_code)
    teacher = load_causal_lm(
        cfg.teacher, device, teacher_dtype or torch.float32, cfg.trust_remote_code, device_map=cfg.teacher_device_map
    )
    classes = num_classes(teacher_tok)
    if vocab_size(teacher) < classes:
        raise TrainError(
            f"--teacher {cfg.teacher}: its head has {vocab_size(teacher):,} rows, fewer than its tokenizer's "
            f"{classes:,} tokens; use a teacher with a logit for every token"
        )
    spec = cfg.class_spec
    assert spec is not None and cfg.temperature is not None and cfg.eval_fraction is not None
    doc_attention = cfg.doc_attention is not False  # online default: on
    try:
        spec.check_vocab(classes)
        if doc_attention:
            check_separates(teacher, f"--teacher {cfg.teacher}")
    except ValueError as err:
        raise TrainError(str(err)) from err
    corpus = corpus_tokens(  # every rank tokenizes its share into OUT/tokens (or opens --tokens)
        cfg,
        prepare_into=str(Path(cfg.out) / CACHE_TOKENS_PREFIX),
        tokenizer=teacher_tok,
        tokenizer_name=cfg.teacher,  # type: ignore[arg-type]
        rank=dist_info.rank,
        world=dist_info.world_size,
    ).packed(cfg.max_seq_len or 512)
    live = OnlineTeacher(
        teacher, spec, cfg.temperature, seed=cfg.seed + dist_info.rank, classes=classes, doc_attention=doc_attention
    )
    common: dict[str, Any] = dict(
        eval_fraction=cfg.eval_fraction,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        split_seed=cfg.split_seed,
        pad_id=pad_id,
        loss_on=cfg.loss_on,
    )
    loader = OnlineStream(corpus, live, split="train", rank=dist_info.rank, world_size=dist_info.world_size, **common)
    eval_source = OnlineStream(corpus, live, split="eval", shuffle=False, drop_last=False, **common)
    return Data(
        loader=loader,
        eval_source=eval_source if eval_source.num_sequences else None,
        batches_per_epoch=loader.steps_per_epoch(),
        mode=spec.mode,
        temperature=cfg.temperature,
        num_classes=classes,
        teacher_generator=live.generator,  # sample:N draws; checkpointed with the rank's state
        doc_attention=doc_attention,
    )


def check_student_fits(cfg: TrainConfig, data: Data, student_vocab: int) -> None:
    """Refuse a student whose head cannot hold every real class (the tokenizer's C tokens; the teacher's
    head size does not matter: its padded rows are dropped from the targets), and options the targets do
    not support, before any training."""
    classes, mode = data.num_classes, data.mode
    if student_vocab < classes:
        raise TrainError(
            f"the student's head ({student_vocab:,} rows) is smaller than the tokenizer ({classes:,} tokens): "
            "it has no logit for every class the targets use; use a student with a head of at least "
            f"{classes:,} rows"
        )
    if problem := check_targets(mode, cfg):  # online mode: checked when the options were parsed
        raise TrainError(problem)

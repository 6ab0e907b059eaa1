"""`selkd-cache build`: corpus -> sequences -> (scores ->) teacher outputs -> committed parts.

The build is a deterministic function of its settings: every builder (rank) derives the same
sequence list, eval split, sample selection and part plan, then writes only its own parts
(part p belongs to rank p % world_size). A part is committed atomically, so a rerun of the same
command skips committed parts and redoes the rest; the last builder to finish finalises the root.

Builders that would write the same part (two launched with the same rank, or a rerun started while
the first run still goes) are kept apart by a lease per part in the store (``selkd/leases/``, see
:mod:`selkd.cache.leases`): a builder writes a part only while it holds the part's lease, renews it
between batches and right before the commit record, and skips a part another live builder holds,
coming back to it at the end (the other builder commits it, or its lease lapses and this builder
takes the part over). A holder that lost its lease never writes the commit record.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from selkd.cache import format as fmt
from selkd.cache.classes import ClassSpec, head_outputs
from selkd.cache.config import BuildConfig
from selkd.cache.corpus import eval_mask
from selkd.cache.doc_attention import attention_inputs, check_separates
from selkd.cache.errors import BuildError
from selkd.cache.fingerprints import tokenizer_fingerprint
from selkd.cache.header import agree_header, finalize, make_header, open_output
from selkd.cache.leases import LeasedPartWriter, PartLeases, log, run_leased
from selkd.cache.logits import TeacherHead
from selkd.cache.prepare import corpus_tokens
from selkd.cache.scoring import (
    commit_scores,
    committed_score_parts,
    mean_entropy,
    read_scores,
    score_part_sequences,
    select_top,
    wait_for,
)
from selkd.cache.store import Storage
from selkd.cache.teacher import (
    load_causal_lm,
    load_tokenizer,
    num_classes,
    resolve_device,
    resolve_dtype,
    vocab_size,
)
from selkd.cache.tokens import CACHE_TOKENS_PREFIX, Packing, TokenStore


def torchrun_rank_world(cfg: BuildConfig) -> tuple[int, int]:
    """--rank/--world-size, else torchrun's RANK/WORLD_SIZE (its launch contract), else 0/1."""
    rank = cfg.rank if cfg.rank is not None else int(os.environ.get("RANK", "0"))
    world = cfg.world_size if cfg.world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world:
        raise BuildError(f"rank {rank} is not in [0, world size {world})")
    return rank, world


@dataclass
class Plan:
    """Which sequences each part holds; identical on every builder."""

    parts: list[dict[str, Any]]  # name, split, n_sequences
    members: list[np.ndarray]  # global sequence indices per part

    def to_json(self, extra: dict[str, Any]) -> dict[str, Any]:
        return {"parts": self.parts, **extra}


def make_plan(eval_index: np.ndarray, train_index: np.ndarray, seqs_per_part: int) -> Plan:
    parts, members = [], []
    for split, index in (("eval", eval_index), ("train", train_index)):
        for s in range(0, len(index), seqs_per_part):
            chunk = index[s : s + seqs_per_part]
            parts.append({"name": fmt.part_name(len(parts)), "split": split, "n_sequences": len(chunk)})
            members.append(chunk)
    return Plan(parts, members)


@dataclass
class BuildResult:
    parts_written: int
    parts_skipped: int
    sequences: int
    positions: int
    bytes_written: int
    seconds: float  # the whole command
    teacher_seconds: float  # the teacher pass over this builder's parts (forward, selection, writing)
    finalized: bool


class _Overlap:
    """Runs class selection, encoding and writing on one background thread so they overlap the
    next teacher forward pass (torch and numpy release the GIL). At most ``depth`` batches wait.
    Once a task fails, every later task (a part's commit above all) is skipped, not run."""

    def __init__(self, depth: int = 2) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="selkd-encode")
        self.pending: list[Future[Any]] = []
        self.depth = depth
        self.failed = False

    def _guarded(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.failed:
            raise RuntimeError("skipped after an earlier failure")
        try:
            return fn(*args)
        except BaseException:
            self.failed = True
            raise

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self.pending.append(self.pool.submit(self._guarded, fn, *args))
        while len(self.pending) > self.depth:
            self.pending.pop(0).result()

    def drain(self) -> None:
        while self.pending:
            self.pending.pop(0).result()

    def close(self) -> None:
        self.failed = True  # anything still queued is abandoned, never committed
        self.pool.shutdown(wait=True, cancel_futures=True)


def _batches(corpus: Packing, index: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Batches of sequence indices with one length each (only the corpus's last sequence is short)."""
    out = []
    lengths = np.array([corpus.sequence_bounds(int(i))[1] - corpus.sequence_bounds(int(i))[0] for i in index])
    for length in np.unique(lengths):
        same = index[lengths == length]
        out.extend(same[s : s + batch_size] for s in range(0, len(same), batch_size))
    return out


def builder_device(cfg: BuildConfig) -> torch.device:
    """--device, where ``auto``/``cuda`` under torchrun means the local rank's GPU (every rank of a
    node would otherwise load its teacher onto GPU 0)."""
    device = resolve_device(None if cfg.device == "auto" else cfg.device)
    local = os.environ.get("LOCAL_RANK")
    if device.type == "cuda" and device.index is None and local is not None and local.isdigit():
        device = torch.device("cuda", int(local) % max(1, torch.cuda.device_count()))
    return device


@dataclass
class _Build:
    """What the stages of one builder share: its settings and place, the output, the loaded inputs."""

    cfg: BuildConfig
    spec: ClassSpec
    rank: int
    world: int
    t0: float  # when the command started (the live tokens/s count from it)
    storage: Storage
    device: torch.device
    dtype: torch.dtype
    teacher: Any  # the teacher causal LM, frozen
    head: TeacherHead  # the teacher run as decoder, then head a chunk of positions at a time
    classes: int  # C = num_classes(tokenizer): the teacher's logit columns >= C are padding
    corpus: Packing  # the packed sequences of the token store
    is_eval: np.ndarray  # [n_sequences] bool: the held-out split
    leases: PartLeases
    seqs_per_part: int


@dataclass
class _TeacherPass:
    """What this builder's teacher pass did. ``positions_run`` includes abandoned attempts (shown live);
    ``positions`` and ``bytes_written`` count committed parts only."""

    parts_mine: int = 0
    parts_written: int = 0
    sequences: int = 0
    positions_run: int = 0
    positions: int = 0
    bytes_written: int = 0
    seconds: float = 0.0


def build_cache(cfg: BuildConfig, argv: Sequence[str] | None = None) -> BuildResult:
    """Build (or resume building) this builder's share of the cache ``cfg`` describes."""
    t0 = time.time()
    rank, world = torchrun_rank_world(cfg)
    ctx = _setup(cfg, argv, rank, world, t0)  # output, models, corpus, header
    train_index = np.flatnonzero(~ctx.is_eval)
    if cfg.sample_ratio is not None:
        train_index = _select_samples(ctx, train_index)  # score every training sequence once, keep the top
    plan = _agree_plan(ctx, np.flatnonzero(ctx.is_eval), train_index)  # the same on every builder
    done = _write_parts(ctx, plan)  # the teacher pass over this builder's parts, each under its lease
    finalized = _finalize_if_complete(ctx.storage, plan)
    seconds = time.time() - t0
    result = BuildResult(
        done.parts_written,
        done.parts_mine - done.parts_written,
        done.sequences,
        done.positions,
        done.bytes_written,
        seconds,
        done.seconds,
        finalized,
    )
    per_pos = done.bytes_written / done.positions if done.positions else float("nan")
    log(
        f"done in {seconds:.1f} s: {result.parts_written} parts written ({result.parts_skipped} already there), "
        f"{done.positions:,} positions, {done.bytes_written:,} bytes ({per_pos:.1f} B/position) -> {ctx.storage.url}"
    )
    return result


# ----------------------------------------------------------------------------- setup


def _setup(cfg: BuildConfig, argv: Sequence[str] | None, rank: int, world: int, t0: float) -> _Build:
    """Open the output, load the teacher (and check the student's tokenizer), read the corpus, and write
    the header or check that the existing one has the same settings."""
    spec = cfg.class_spec
    storage, existing = open_output(cfg)
    device = builder_device(cfg)
    dtype = resolve_dtype(None if cfg.dtype == "auto" else cfg.dtype, device)
    tokenizer = load_tokenizer(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
    teacher = load_causal_lm(
        cfg.teacher, device, dtype, trust_remote_code=cfg.trust_remote_code, device_map=cfg.teacher_device_map
    )
    vocab, classes = vocab_size(teacher), num_classes(tokenizer)
    if classes > vocab:
        raise BuildError(
            f"--teacher {cfg.teacher}: its head has {vocab:,} rows, fewer than its tokenizer's {classes:,} tokens; "
            "use a teacher with a logit for every token"
        )
    try:
        spec.check_vocab(classes)
        if cfg.doc_attention:
            check_separates(teacher, f"--teacher {cfg.teacher}")
    except ValueError as err:
        raise BuildError(str(err)) from err
    tokens, corpus = _load_corpus(cfg, tokenizer, classes, rank, world)
    if cfg.student is not None:
        student_tok = load_tokenizer(cfg.student, trust_remote_code=cfg.trust_remote_code)
        if tokenizer_fingerprint(student_tok) != tokenizer_fingerprint(tokenizer):
            raise BuildError(
                f"--student {cfg.student} has another tokenizer than --teacher {cfg.teacher} (fingerprints "
                "differ); sample selection needs a student that shares the teacher's tokenizer"
            )
    is_eval = eval_mask(corpus.n_sequences, cfg.eval_fraction, cfg.seed)
    header = make_header(cfg, argv, teacher, dtype, tokenizer, vocab, tokens, corpus, is_eval)
    agree_header(storage, existing, header, tokenizer, rank, world)
    leases = PartLeases(storage, cfg.lease_ttl)
    seqs_per_part = max(1, cfg.part_tokens // cfg.max_seq_len)
    head = TeacherHead(teacher, cfg.head_chunk_tokens)
    return _Build(
        cfg,
        spec,
        rank,
        world,
        t0,
        storage,
        device,
        dtype,
        teacher,
        head,
        classes,
        corpus,
        is_eval,
        leases,
        seqs_per_part,
    )


def _load_corpus(cfg: BuildConfig, tokenizer: Any, classes: int, rank: int, world: int) -> tuple[TokenStore, Packing]:
    """The token store (``--tokens``, or ``--data`` prepared into STORE/tokens by every rank's share) and
    its packed sequences; the corpus's warnings are logged, and a token id the teacher has no logit for
    is refused."""
    tokens = corpus_tokens(
        cfg,
        prepare_into=f"{cfg.out.rstrip('/')}/{CACHE_TOKENS_PREFIX}",
        tokenizer=tokenizer,
        tokenizer_name=cfg.teacher,
        rank=rank,
        world=world,
    )
    corpus = tokens.packed(cfg.max_seq_len)
    for warning in corpus.stats.warnings():
        log(f"warning: {warning}")
    if corpus.max_token_id >= classes:
        raise BuildError(f"token id {corpus.max_token_id} >= the teacher's vocabulary ({classes})")
    return tokens, corpus


# ----------------------------------------------------------------------------- score


def _select_samples(ctx: _Build, train_index: np.ndarray) -> np.ndarray:
    """The training sequences kept by ``--sample-ratio``: this builder scores its score parts (each
    under its lease), waits for the other builders' scores, and keeps the top ones."""
    cfg, storage = ctx.cfg, ctx.storage
    groups = score_part_sequences(train_index, ctx.seqs_per_part)
    done = committed_score_parts(storage)
    todo = [i for i in range(len(groups)) if i % ctx.world == ctx.rank and fmt.score_part_name(i) not in done]
    _score_parts(ctx, groups, todo)
    wait_for(lambda: len(committed_score_parts(storage)) >= len(groups), "other builders to finish scoring")
    idx_all, val_all = read_scores(storage)
    kept = select_top(idx_all, val_all, cfg.sample_ratio)  # type: ignore[arg-type]
    log(
        f"sample selection: kept {len(kept)} of {len(idx_all)} training sequences "
        f"(top {cfg.sample_ratio:g} by {cfg.sample_signal})"
    )
    return kept


def _score_parts(ctx: _Build, groups: list[np.ndarray], todo: list[int]) -> None:
    """Score and commit the score parts ``todo`` (indices into ``groups``, each a part's sequence
    indices): mean entropy of the student or teacher per sequence, or seeded random numbers."""
    cfg, corpus = ctx.cfg, ctx.corpus
    scorer = None
    if cfg.sample_signal == "student-entropy" and todo:
        scorer = load_causal_lm(cfg.student, ctx.device, ctx.dtype, trust_remote_code=cfg.trust_remote_code)  # type: ignore[arg-type]
        if cfg.doc_attention:
            try:
                check_separates(scorer, f"--student {cfg.student}")
            except ValueError as err:
                raise BuildError(str(err)) from err
    elif cfg.sample_signal == "teacher-entropy":
        scorer = ctx.teacher
    bar = tqdm(
        total=sum(len(groups[i]) for i in todo),
        unit="seq",
        desc="scoring samples",
        disable=not cfg.progress,
        dynamic_ncols=True,
    )

    def score(name: str) -> None:
        i = int(name.removeprefix("score-"))
        idx = groups[i]
        if scorer is None:  # random: seeded per score part, independent of rank
            scores = np.random.default_rng([cfg.seed, i]).random(len(idx)).astype(np.float32)
        else:
            scores = np.empty(len(idx), dtype=np.float32)
            pos = {int(s): j for j, s in enumerate(idx)}
            for b in _batches(corpus, idx, cfg.batch_size):
                ctx.leases.renew(name, due_only=True)
                seqs, doc = corpus.read(b)
                x = torch.from_numpy(np.stack(seqs).astype(np.int64)).to(ctx.device)
                starts = torch.from_numpy(np.stack(doc)).to(ctx.device) if cfg.doc_attention else None
                scores[[pos[int(s)] for s in b]] = mean_entropy(scorer, x, starts).float().cpu().numpy()
                bar.update(len(b))
        ctx.leases.renew(name)
        commit_scores(ctx.storage, name, idx, scores, cfg.sample_signal)

    run_leased(ctx.storage, ctx.leases, [fmt.score_part_name(i) for i in todo], score)
    bar.close()  # the student scorer is freed on return, before the teacher pass


# ----------------------------------------------------------------------------- plan


def _agree_plan(ctx: _Build, eval_index: np.ndarray, train_index: np.ndarray) -> Plan:
    """The part plan, stored by the first builder to get here; every other builder must derive the same."""
    plan = make_plan(eval_index, train_index, ctx.seqs_per_part)
    plan_json = plan.to_json({"seqs_per_part": ctx.seqs_per_part, "world_size_hint": ctx.world})
    saved_plan = ctx.storage.read_json(fmt.PLAN_KEY)
    if saved_plan is None:
        ctx.storage.write_json(fmt.PLAN_KEY, plan_json)
    elif saved_plan["parts"] != plan_json["parts"]:
        raise BuildError(f"{ctx.storage.url}: the stored part plan differs from this build's; use a new --out")
    return plan


# ----------------------------------------------------------------------------- write parts


def _committed(storage: Storage) -> set[str]:
    return {n.removesuffix(".json") for n in storage.list_dir(fmt.COMMITS_PREFIX)}


def _write_parts(ctx: _Build, plan: Plan) -> _TeacherPass:
    """Run the teacher over this builder's parts (part p belongs to rank p % world size) that are not
    committed yet, writing and committing each under its lease."""
    committed = _committed(ctx.storage)
    mine = [i for i in range(len(plan.parts)) if i % ctx.world == ctx.rank]
    todo = [i for i in mine if plan.parts[i]["name"] not in committed]
    if len(mine) > len(todo):
        log(f"resuming: {len(mine) - len(todo)} of {len(mine)} parts of this builder are already committed")
    index_of = {plan.parts[i]["name"]: i for i in todo}
    done = _TeacherPass(parts_mine=len(mine), sequences=sum(len(plan.members[i]) for i in todo))
    bar = tqdm(
        total=done.sequences,
        unit="seq",
        desc=f"teacher [rank {ctx.rank}/{ctx.world}]" if ctx.world > 1 else "teacher",
        disable=not ctx.cfg.progress,
        dynamic_ncols=True,
    )
    t_teacher = time.time()
    try:
        done.parts_written = run_leased(
            ctx.storage,
            ctx.leases,
            list(index_of),
            lambda name: _write_part(ctx, plan, index_of[name], bar, done),
        )
    finally:
        bar.close()
    done.seconds = time.time() - t_teacher
    return done


def _write_part(ctx: _Build, plan: Plan, i: int, bar: tqdm, done: _TeacherPass) -> None:
    """Part ``i``: teacher forward per batch on this thread, class selection, encoding and writing on
    the encode thread (:class:`_Overlap`), then the commit; a failure anywhere commits nothing. A
    sequence none of whose targets trains (``--loss-on assistant``: a stretch of prompt) is not run or
    stored; the commit record counts it (``n_skipped``)."""
    cfg, corpus, spec = ctx.cfg, ctx.corpus, ctx.spec
    name, split = plan.parts[i]["name"], plan.parts[i]["split"]
    writer = LeasedPartWriter(ctx.storage, ctx.leases, name, split, spec.mode, spec.k, ctx.classes)
    gen = torch.Generator(device=ctx.head.device).manual_seed(cfg.seed * 1_000_003 + i)
    overlap = _Overlap()
    skipped = 0
    try:
        for b in _batches(corpus, plan.members[i], cfg.batch_size):
            ctx.leases.renew(name, due_only=True)
            b = np.sort(b)
            seqs, doc = corpus.read(b)
            masks = corpus.loss_masks(b, cfg.loss_on)
            keep = [r for r in range(len(b)) if fmt.trained_targets(masks[r]).any()]  # no target trains: skipped
            skipped += len(b) - len(keep)
            bar.update(len(b))
            if not keep:
                continue
            b, seqs, doc, masks = b[keep], [seqs[r] for r in keep], [doc[r] for r in keep], [masks[r] for r in keep]
            x = torch.from_numpy(np.stack(seqs).astype(np.int64)).to(ctx.head.input_device)
            starts = torch.from_numpy(np.stack(doc)).to(ctx.head.input_device)
            with torch.no_grad():
                hidden = ctx.head.decode(x, **attention_inputs(starts, None, cfg.doc_attention))[:, :-1]
            nxt = x[:, 1:]

            def encode(writer=writer, b=b, seqs=seqs, doc=doc, masks=masks, hidden=hidden, nxt=nxt, gen=gen) -> None:
                # the batch's positions one sequence after another, a head chunk at a time through one buffer
                with torch.no_grad():
                    out = head_outputs(ctx.head, hidden, nxt.reshape(-1), spec, cfg.temperature, gen, ctx.classes)
                writer.add(b, seqs, doc, out, masks)

            overlap.submit(encode)
            done.positions_run += int(nxt.numel())  # this thread only: the encode thread never counts
            bar.set_postfix(tok_s=f"{done.positions_run / max(time.time() - ctx.t0, 1e-9):,.0f}")
        record: dict[str, Any] = {}

        def commit(writer=writer, record=record) -> None:
            record.update(writer.commit({"n_skipped": skipped}))

        overlap.submit(commit)
        overlap.drain()
        done.bytes_written += record["bytes"]
        done.positions += int(record["n_targets"])
    finally:
        overlap.close()  # after a failure: anything still queued (the commit above all) is dropped


# ----------------------------------------------------------------------------- finalize


def _finalize_if_complete(storage: Storage, plan: Plan) -> bool:
    """Finalize the root once every planned part is committed (by any builder); say who will if not."""
    committed = _committed(storage)
    if all(p["name"] in committed for p in plan.parts):
        finalize(storage)
        return True
    left = sum(p["name"] not in committed for p in plan.parts)
    log(
        f"{left} parts belong to other builders and are not committed yet; the last builder to finish "
        f"finalises the cache (or run `selkd-cache finalize {storage.url}`)"
    )
    return False

"""One training batch: B cached sequences padded to a common length, with their teacher targets."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from selkd.cache.reader import (
    CachedSequence,
)
from selkd.cache.targets import SparseTargets

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "Batch", "collate"]


# --- batches -------------------------------------------------------------------------------------


@dataclass
class Batch:
    """B sequences padded to the longest one (L tokens).

    ``labels[b, t]`` is ``input_ids[b, t + 1]`` where the teacher has a target that trains (positions
    ``0 .. len_b - 2`` whose :attr:`CachedSequence.trained` is set: with ``--loss-on assistant`` only
    those before an assistant token of a chat row) and -100 elsewhere (the last real position, padding,
    prompt positions); ``valid`` is ``labels != -100``: selection, KD and CE see only valid positions.
    ``targets`` has leading shape ``[B, L]`` (past a sequence's end: ids 0, logprob -inf);
    ``teacher_entropy`` and ``teacher_logprob`` are 0 where invalid.
    """

    input_ids: torch.Tensor  # [B, L] int64, padded with pad_id
    attention_mask: torch.Tensor  # [B, L] int64 (1 = real token)
    labels: torch.Tensor  # [B, L] int64
    valid: torch.Tensor  # [B, L] bool
    targets: SparseTargets  # leading [B, L]
    teacher_entropy: torch.Tensor  # [B, L] float32
    teacher_logprob: torch.Tensor  # [B, L] float32
    seq_index: torch.Tensor  # [B] int64 global (corpus) sequence indices
    doc_start: torch.Tensor  # [B, L] bool, True at a document's first token (False at padding)

    def _map(self, fn: Any) -> Batch:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)

        tg = self.targets
        return Batch(
            input_ids=fn(self.input_ids),
            attention_mask=fn(self.attention_mask),
            labels=fn(self.labels),
            valid=fn(self.valid),
            targets=replace(tg, ids=mv(tg.ids), logprobs=fn(tg.logprobs), tail_logmass=mv(tg.tail_logmass)),
            teacher_entropy=fn(self.teacher_entropy),
            teacher_logprob=fn(self.teacher_logprob),
            seq_index=fn(self.seq_index),
            doc_start=fn(self.doc_start),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Every tensor moved to ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Every tensor in pinned memory (called by ``DataLoader(pin_memory=True)``)."""
        return self._map(lambda t: t.pin_memory())

    def student_inputs(self) -> tuple[Any, ...]:
        """The leading arguments of :class:`~selkd.trainer.student.SelectiveStudent`'s forward, in order:
        input_ids, attention_mask, labels, valid, targets, teacher_entropy, teacher_logprob."""
        return (
            self.input_ids,
            self.attention_mask,
            self.labels,
            self.valid,
            self.targets,
            self.teacher_entropy,
            self.teacher_logprob,
        )

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return int(self.attention_mask.sum())

    @property
    def num_targets(self) -> int:
        """Positions with a teacher target."""
        return int(self.valid.sum())

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def collate(seqs: list[CachedSequence], pad_id: int) -> Batch:
    """Pad and stack cached sequences into a :class:`Batch` (numpy mask-scatter; the targets are
    stacked with :meth:`SparseTargets.stack_padded`)."""
    if not seqs:
        raise ValueError("collate needs at least one sequence")
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    if lengths.min() < 1:
        raise ValueError("collate: empty sequence")
    b, length = len(seqs), int(lengths.max())
    pos = np.arange(length)
    tok_mask = pos[None, :] < lengths[:, None]
    tgt_mask = pos[None, :] < (lengths - 1)[:, None]

    input_ids = np.full((b, length), pad_id, dtype=np.int64)
    input_ids[tok_mask] = np.concatenate([s.input_ids for s in seqs])
    valid = np.zeros((b, length), dtype=np.bool_)
    valid[tgt_mask] = np.concatenate([np.ones(len(s) - 1, np.bool_) if s.trained is None else s.trained for s in seqs])
    labels = np.full((b, length), IGNORE_INDEX, dtype=np.int64)
    labels[tgt_mask] = np.concatenate([s.input_ids[1:] for s in seqs])
    labels[~valid] = IGNORE_INDEX
    entropy = np.zeros((b, length), dtype=np.float32)
    entropy[tgt_mask] = np.concatenate([s.teacher_entropy for s in seqs])
    logprob = np.zeros((b, length), dtype=np.float32)
    logprob[tgt_mask] = np.concatenate([s.teacher_logprob for s in seqs])
    doc_start = np.zeros((b, length), dtype=np.bool_)
    doc_start[tok_mask] = np.concatenate([s.doc_start for s in seqs])
    entropy[~valid] = logprob[~valid] = 0.0

    return Batch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(tok_mask.astype(np.int64)),
        labels=torch.from_numpy(labels),
        valid=torch.from_numpy(valid),
        targets=SparseTargets.stack_padded([s.targets for s in seqs], length),
        teacher_entropy=torch.from_numpy(entropy),
        teacher_logprob=torch.from_numpy(logprob),
        seq_index=torch.tensor([s.seq_index for s in seqs], dtype=torch.int64),
        doc_start=torch.from_numpy(doc_start),
    )

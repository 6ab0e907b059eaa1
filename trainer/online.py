"""Online mode: the teacher runs in the loop and makes the same SparseTargets a cache would hold.

The corpus is read and packed exactly as `selkd-cache build` does (a token store, selkd.cache.tokens) and the
targets come from the same class selection (selkd.cache.classes), so the only difference between
online and offline training is where a batch's targets come from.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from selkd.cache import format as fmt
from selkd.cache.classes import head_outputs
from selkd.cache.config import LOSS_ON, BuildConfig
from selkd.cache.corpus import eval_mask
from selkd.cache.doc_attention import attention_inputs
from selkd.cache.logits import TeacherHead
from selkd.cache.modes import ClassSpec
from selkd.cache.reader import CachedSequence
from selkd.cache.teacher import vocab_size
from selkd.cache.tokens import Packing
from selkd.trainer.batch import Batch, collate


class OnlineTeacher:
    """Turns token sequences into cache-equivalent :class:`CachedSequence` objects, live. ``classes``: C,
    the number of real classes (``num_classes(tokenizer)``); None: every logit column."""

    def __init__(
        self,
        model: nn.Module,
        spec: ClassSpec,
        temperature: float,
        seed: int = 0,
        classes: int | None = None,
        doc_attention: bool = True,
    ) -> None:
        self.model, self.spec, self.temperature, self.classes = model, spec, temperature, classes
        self.doc_attention = doc_attention  # each packed document attends only to itself
        # decoder, then the head a chunk of the batch's positions at a time, as the builder runs it (with its
        # default chunk): the [B, L, V] logits never exist
        self.head = TeacherHead(model, BuildConfig.head_chunk_tokens)
        self.generator = torch.Generator(device=self.head.device).manual_seed(seed)
        self.device = self.head.input_device  # under --teacher-device-map, where its forward takes ids
        self.width = classes if classes is not None else vocab_size(model)  # classes selected over

    @torch.no_grad()
    def sequences(
        self,
        seqs: list[np.ndarray],
        seq_index: np.ndarray,
        doc_start: list[np.ndarray],
        loss_mask: list[np.ndarray] | None = None,
    ) -> list[CachedSequence]:
        """Teacher targets for equal- or mixed-length sequences (one forward per distinct length);
        ``loss_mask``: bool [L] per sequence, True at trained tokens (None: all), as a cache stores it."""
        out: list[CachedSequence | None] = [None] * len(seqs)
        lengths = np.array([len(s) for s in seqs])
        for length in np.unique(lengths):
            rows = np.flatnonzero(lengths == length)
            x = torch.from_numpy(np.stack([seqs[i] for i in rows]).astype(np.int64)).to(self.device)
            starts = torch.from_numpy(np.stack([doc_start[i] for i in rows])).to(self.device)
            hidden = self.head.decode(x, **attention_inputs(starts, None, self.doc_attention))[:, :-1]
            res = head_outputs(  # the rows' positions one after another: row j's are j * n .. (j + 1) * n - 1
                self.head, hidden, x[:, 1:].reshape(-1), self.spec, self.temperature, self.generator, self.width
            )
            n = int(length) - 1
            # one copy to the host per group of rows, then per-row views (float32, as the reader gives them)
            entropy, logprob = res.entropy.float().cpu().numpy(), res.next_logprob.float().cpu().numpy()
            targets = res.targets.to("cpu")
            for j, i in enumerate(rows):
                sl = slice(j * n, (j + 1) * n)
                out[i] = CachedSequence(
                    seq_index=int(seq_index[i]),
                    input_ids=seqs[i],
                    doc_start=doc_start[i],
                    teacher_entropy=entropy[sl],
                    teacher_logprob=logprob[sl],
                    targets=targets.select(sl),
                    trained=None if loss_mask is None else fmt.trained_targets(loss_mask[i]),
                )
        return [s for s in out if s is not None]


class OnlineStream:
    """Batches of a packed corpus with live teacher targets; the same cursor semantics as
    :class:`selkd.trainer.data.CacheStream` (order from (seed, epoch); rank r of W takes global
    batch s*W + r of each step; the remainder is dropped; the cursor moves to the next epoch when
    the last batch of an epoch is taken). ``loss_on``: which positions train (``selkd-cache build
    --loss-on``); a sequence with none keeps its place in the batch and trains nothing, so that every
    rank takes the same steps."""

    def __init__(
        self,
        corpus: Packing,
        teacher: OnlineTeacher,
        *,
        split: str,
        eval_fraction: float,
        batch_size: int,
        seed: int,
        split_seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad_id: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        loss_on: str = LOSS_ON[0],
    ) -> None:
        self.corpus, self.teacher, self.loss_on = corpus, teacher, loss_on
        # the split has its own seed: a new training seed must not move sequences between the splits
        is_eval = eval_mask(corpus.n_sequences, eval_fraction, split_seed)
        self.index = np.flatnonzero(is_eval if split == "eval" else ~is_eval)
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.rank, self.world_size, self.pad_id = rank, world_size, pad_id
        self.shuffle, self.drop_last = shuffle, drop_last
        self._epoch, self._step = 0, 0

    @property
    def num_sequences(self) -> int:
        return len(self.index)

    def steps_per_epoch(self) -> int:
        per = self.batch_size * self.world_size
        return len(self.index) // per if self.drop_last else -(-len(self.index) // per)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch, self._step = epoch, 0

    def state_dict(self) -> dict[str, int | str]:
        return {
            "mode": "online",
            "epoch": self._epoch,
            "step": self._step,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, int | str]) -> None:
        self._epoch, self._step = int(state["epoch"]), int(state["step"])

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return self.index
        return self.index[np.random.default_rng([self.seed, self._epoch]).permutation(len(self.index))]

    def __len__(self) -> int:
        return self.steps_per_epoch() - self._step

    def __iter__(self):
        order = self._order()
        while self._step < self.steps_per_epoch():
            a = (self._step * self.world_size + self.rank) * self.batch_size
            idx = (
                order[np.arange(a, a + self.batch_size) % len(order)]
                if self.world_size > 1
                else order[a : a + self.batch_size]
            )
            idx = np.asarray(idx)
            seqs, docs = self.corpus.read(idx)
            masks = self.corpus.loss_masks(idx, self.loss_on)
            batch: Batch = collate(self.teacher.sequences(seqs, idx, docs, masks), self.pad_id)
            self._step += 1
            if self._step >= self.steps_per_epoch():
                self._epoch, self._step = self._epoch + 1, 0
                yield batch
                return
            yield batch

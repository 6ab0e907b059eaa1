"""Sample selection: score every training sequence once, keep the top fraction.

The scoring pass is cut into score parts, committed like cache parts (arrays under ``scores/``,
a record under ``selkd/score-commits/``), so it is resumable and split across builders. All
scores stay in the cache, also those of sequences that were not kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from selkd.cache import format as fmt
from selkd.cache.store import Storage
from selkd.cache.writer import array_checksum, write_array

if TYPE_CHECKING:
    import torch


def mean_entropy(
    model: torch.nn.Module, batch: torch.Tensor, doc_start: torch.Tensor | None = None, chunk: int = 128
) -> torch.Tensor:
    """Mean entropy (nats, temperature 1) of the model's next-token distribution over the L - 1
    predicting positions of each sequence: [B, L] tokens -> [B] float32. With ``doc_start`` ([B, L]
    bool) each packed document attends only to itself (:mod:`selkd.cache.doc_attention`). The logits are
    ``model(...).logits`` (its post-head transform applied, as the trainer does), made from the final
    hidden states a chunk of positions at a time, so [B, L, V] is never materialised.

    torch and transformers are imported here, not with the module: the reader reads score parts
    through this module, and ``selkd-cache info`` / ``verify`` should not pay for them."""
    import torch

    from selkd.cache.doc_attention import attention_inputs
    from selkd.cache.logits import apply_head, hidden_states, lm_head, logits_transform, softmax_entropy
    from selkd.cache.teacher import ModelError

    try:
        transform = logits_transform(model)
    except ValueError as err:
        raise ModelError(f"sample scoring: {err}") from None
    head = lm_head(model)
    with torch.no_grad():
        hidden = hidden_states(model, batch, **attention_inputs(doc_start, None, doc_start is not None))[:, :-1]
        b, n, h = hidden.shape
        flat = hidden.reshape(-1, h)
        ent = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
        for s in range(0, flat.shape[0], chunk):
            ent[s : s + chunk] = softmax_entropy(apply_head(head, flat[s : s + chunk], transform)).entropy
    return ent.view(b, n).mean(-1)


def score_part_sequences(train_index: np.ndarray, seqs_per_part: int) -> list[np.ndarray]:
    return [train_index[s : s + seqs_per_part] for s in range(0, len(train_index), seqs_per_part)]


def committed_score_parts(storage: Storage) -> set[str]:
    return {n.removesuffix(".json") for n in storage.list_dir(fmt.SCORE_COMMITS_PREFIX)}


def commit_scores(storage: Storage, name: str, seq_index: np.ndarray, scores: np.ndarray, signal: str) -> None:
    prefix = f"{fmt.SCORES_GROUP}/{name}"
    storage.delete_prefix(prefix)
    seq_index = seq_index.astype(np.int64)
    scores = scores.astype(np.float32)
    write_array(storage, f"{prefix}/seq_index", seq_index)
    write_array(storage, f"{prefix}/score", scores)
    storage.write_json(
        f"{fmt.SCORE_COMMITS_PREFIX}/{name}.json",
        {
            "part": name,
            "signal": signal,
            "n_sequences": len(seq_index),
            "arrays": {
                "seq_index": {"sha256": array_checksum(seq_index)},
                "score": {"sha256": array_checksum(scores)},
            },
        },
    )


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 7 * 24 * 3600, poll_s: float = 2.0) -> None:
    """Block until another builder has finished ``what`` (polling the store)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"gave up waiting for {what} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def select_top(seq_index: np.ndarray, scores: np.ndarray, ratio: float) -> np.ndarray:
    """The ceil(ratio * n) highest-scored sequence indices (ties: lower index first), sorted."""
    n = len(seq_index)
    keep = max(1, math.ceil(ratio * n)) if n else 0
    order = np.lexsort((seq_index, -scores.astype(np.float64)))
    return np.sort(seq_index[order[:keep]])


def read_scores(storage: Storage) -> tuple[np.ndarray, np.ndarray]:
    """(seq_index int64 [n], score float32 [n]) of every committed score part, by sequence index."""
    idx, val = [], []
    for name in sorted(committed_score_parts(storage)):
        idx.append(storage.open_array(f"{fmt.SCORES_GROUP}/{name}/seq_index")[:])
        val.append(storage.open_array(f"{fmt.SCORES_GROUP}/{name}/score")[:])
    return sort_scores(idx, val)


def sort_scores(idx: list[np.ndarray], val: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The score parts' (seq_index, score) arrays joined and ordered by sequence index."""
    if not idx:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    seq_index, scores = np.concatenate(idx), np.concatenate(val)
    order = np.argsort(seq_index, kind="stable")
    return seq_index[order], scores[order]

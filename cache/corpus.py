"""The packed corpus in memory, and the eval split.

The cache stores teacher targets per position of fixed-length sequences, so every stage needs the
exact same token stream, cut the same way. :class:`selkd.cache.tokens.Packing` holds the cutting
rule; :class:`PackedCorpus` is a whole stream in memory, for small corpora (tests, the demo, benchmarks):
:func:`load_corpus` prepares a token store in memory (:mod:`selkd.cache.prepare`, the same tokenizing
code as ``selkd-cache prepare``) and reads it back whole. Large corpora are read from a token store on
disk or S3 through :class:`selkd.cache.tokens.PackedTokens` instead, which never holds the corpus.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from selkd.cache.config import PrepareConfig
from selkd.cache.documents import CorpusStats
from selkd.cache.prepare import prepare_tokens
from selkd.cache.sources import resolve_specs
from selkd.cache.store import Storage
from selkd.cache.tokens import Packing, TokenStore, view_fingerprint

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class PackedCorpus(Packing):
    """The token stream in memory, cut into consecutive ``max_seq_len`` sequences (see :class:`Packing`);
    sequences are views into ``tokens``, never copies."""

    tokens: np.ndarray  # int32 [n_tokens]
    doc_start: np.ndarray  # bool [n_tokens], True at the first token of each document
    max_seq_len: int
    fingerprint: str
    stats: CorpusStats = field(default_factory=CorpusStats)
    loss_mask: np.ndarray | None = None  # bool [n_tokens], True at trained tokens; None: all trained

    @classmethod
    def from_store(cls, store: TokenStore, max_seq_len: int) -> PackedCorpus:
        """The whole stream of ``store`` read into memory."""
        tokens, doc_start = store.read(0, store.n_tokens)
        fingerprint = view_fingerprint(store.summary["content_sha256"], max_seq_len)
        return cls(tokens, doc_start, max_seq_len, fingerprint, store.stats, store.read_mask(0, store.n_tokens))

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def max_token_id(self) -> int:
        return int(self.tokens.max()) if self.tokens.size else -1

    def _read_range(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        return self.tokens[start:end], self.doc_start[start:end]

    def _read_mask_range(self, start: int, end: int) -> np.ndarray:
        return np.ones(end - start, np.bool_) if self.loss_mask is None else self.loss_mask[start:end]

    def sequence(self, i: int) -> np.ndarray:
        """int32 tokens of sequence ``i`` (a view into the stream, no copy)."""
        start, end = self.sequence_bounds(i)
        return self.tokens[start:end]

    def sequence_doc_start(self, i: int) -> np.ndarray:
        """bool document-start marks of sequence ``i`` (a view)."""
        start, end = self.sequence_bounds(i)
        return self.doc_start[start:end]


def load_corpus(
    specs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int = 512,
    text_field: str = "text",
    limit_tokens: int | None = None,
    progress: bool = True,
) -> PackedCorpus:
    """Read, tokenize and pack ``specs`` in memory. Every document is followed by EOS; ``limit_tokens``
    caps the stream exactly and stops reading once it is reached. Raises DataError for bad specs or an
    empty corpus; data problems that are only counted are in ``result.stats.warnings()``."""
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
    if limit_tokens is not None and limit_tokens < 2:
        raise ValueError(f"limit_tokens must be None or >= 2, got {limit_tokens}")
    specs = [specs] if isinstance(specs, (str, os.PathLike)) else list(specs)
    sources = resolve_specs(specs)  # bad specs fail here, before anything else
    cfg = PrepareConfig(
        data=[os.fspath(s) for s in specs],
        tokenizer=getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
        out="memory",
        text_field=text_field,
        limit_tokens=limit_tokens,
        progress=progress,
    )
    store = prepare_tokens(cfg, tokenizer, storage=Storage.memory(), sources=sources)
    return PackedCorpus.from_store(store, max_seq_len)


def eval_mask(n_sequences: int, fraction: float, seed: int = 0) -> np.ndarray:
    """Deterministic held-out set: exactly ``round(fraction * n)`` sequences (at least 1 when
    ``fraction > 0`` and ``n >= 2``, never all of them), picked by a seeded permutation so the split
    depends only on ``(n, fraction, seed)``; a larger fraction gives a superset of a smaller one."""
    if n_sequences < 0:
        raise ValueError(f"n_sequences must be >= 0, got {n_sequences}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval fraction must be in [0, 1), got {fraction}")
    mask = np.zeros(n_sequences, dtype=np.bool_)
    k = round(fraction * n_sequences)
    if fraction > 0 and n_sequences >= 2:
        k = max(k, 1)
    k = min(k, max(n_sequences - 1, 0))
    if k > 0:
        perm = np.random.default_rng(seed).permutation(n_sequences)
        mask[perm[:k]] = True
    return mask

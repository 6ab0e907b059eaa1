"""Documents -> one packed token stream in the teacher's tokenizer.

The cache stores teacher targets per position of fixed-length sequences, so every later stage needs
the exact same token stream. This module tokenizes the documents of :mod:`selkd.cache.documents` in
batches (no per-token Python), appends EOS after every document, and cuts the stream into
consecutive ``max_seq_len`` sequences. Document boundaries are kept as a bool mask so that later
stages can reset or mask across them. An empty corpus raises :class:`~selkd.cache.documents.DataError`.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from selkd.cache.documents import CorpusStats, DataError, resolve_specs, source_documents

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_BATCH_DOCS = 1024
_BATCH_CHARS = 4_000_000


def corpus_fingerprint(tokens: np.ndarray, max_seq_len: int) -> str:
    """sha256 hex of the stream (int32 little-endian) and ``max_seq_len``: the identity of the
    packed sequences, so a cache can refuse to resume or train on a different corpus."""
    h = hashlib.sha256()
    h.update(memoryview(np.ascontiguousarray(tokens, dtype="<i4")).cast("B"))
    h.update(struct.pack("<q", int(max_seq_len)))
    return h.hexdigest()


@dataclass
class PackedCorpus:
    """The token stream cut into consecutive ``max_seq_len`` sequences (the last one may be shorter,
    but has at least 2 tokens so it still yields one next-token target)."""

    tokens: np.ndarray  # int32 [n_tokens]
    doc_start: np.ndarray  # bool [n_tokens], True at the first token of each document
    max_seq_len: int
    fingerprint: str
    stats: CorpusStats = field(default_factory=CorpusStats)

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_sequences(self) -> int:
        full, rest = divmod(self.n_tokens, self.max_seq_len)
        return full + (1 if rest >= 2 else 0)

    def sequence_bounds(self, i: int) -> tuple[int, int]:
        """``[start, end)`` of sequence ``i`` in the stream (negative ``i`` counts from the end)."""
        n = self.n_sequences
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for a corpus of {n} sequences")
        if i < 0:
            i += n
        start = i * self.max_seq_len
        return start, min(start + self.max_seq_len, self.n_tokens)

    def sequence(self, i: int) -> np.ndarray:
        """int32 tokens of sequence ``i`` (a view into the stream, no copy)."""
        start, end = self.sequence_bounds(i)
        return self.tokens[start:end]

    def sequence_doc_start(self, i: int) -> np.ndarray:
        """bool document-start marks of sequence ``i`` (a view)."""
        start, end = self.sequence_bounds(i)
        return self.doc_start[start:end]

    def sequences(self, indices: np.ndarray | Sequence[int]) -> list[np.ndarray]:
        """Views of several sequences; ``indices`` may also be a bool mask over all sequences
        (e.g. from :func:`eval_mask`)."""
        idx = np.asarray(indices)
        if idx.dtype == np.bool_:
            if idx.shape != (self.n_sequences,):
                raise ValueError(f"bool mask of shape {idx.shape} does not match {self.n_sequences} sequences")
            idx = np.flatnonzero(idx)
        return [self.sequence(int(i)) for i in idx.ravel()]


# ----------------------------------------------------------------------------------------------------
# Tokenizing and packing


class _StreamBuilder:
    """Accumulates documents, tokenizes them in batches, and keeps the stream as int32 chunks plus
    the global positions of document starts (concatenated once at the end)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_id: int, limit: int | None, stats: CorpusStats) -> None:
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.limit = limit
        self.stats = stats
        self.pending: list[str] = []
        self.pending_chars = 0
        self.chunks: list[np.ndarray] = []
        self.starts: list[np.ndarray] = []
        self.n_tokens = 0

    @property
    def full(self) -> bool:
        return self.limit is not None and self.n_tokens >= self.limit

    def add(self, doc: str) -> None:
        self.pending.append(doc)
        self.pending_chars += len(doc)
        if len(self.pending) >= _BATCH_DOCS or self.pending_chars >= _BATCH_CHARS:
            self.flush()

    def _scrub(self, doc: str) -> str:
        """Replace lone surrogates (JSON ``\\ud800`` escapes), which the Rust tokenizer rejects."""
        try:
            doc.encode("utf-8")
            return doc
        except UnicodeEncodeError:
            self.stats.docs_with_replaced_bytes += 1
            return doc.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")

    def _encode(self, docs: list[str]) -> list[list[int]]:
        kwargs: dict[str, Any] = {
            "add_special_tokens": False,
            "return_attention_mask": False,
            "return_token_type_ids": False,
            "verbose": False,  # documents longer than model_max_length are expected here
        }
        try:
            return self.tokenizer(docs, **kwargs)["input_ids"]
        except TypeError:
            return self.tokenizer([self._scrub(d) for d in docs], **kwargs)["input_ids"]

    def flush(self) -> None:
        if not self.pending:
            return
        ids = self._encode(self.pending)
        n_docs = len(ids)
        self.pending, self.pending_chars = [], 0
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n_docs)
        ends = np.cumsum(lengths)
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(ends[-1]))
        stream = np.insert(flat, ends, np.int32(self.eos_id))  # EOS after every document
        # Document i starts after all earlier tokens plus one EOS per earlier document.
        local = np.concatenate(([0], ends[:-1] + np.arange(1, n_docs, dtype=np.int64)))
        self.starts.append(local + self.n_tokens)
        self.chunks.append(stream)
        self.n_tokens += int(stream.shape[0])

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        self.flush()
        tokens = np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=np.int32)
        self.chunks = []
        if self.limit is not None and tokens.shape[0] > self.limit:
            tokens = tokens[: self.limit].copy()
        n = int(tokens.shape[0])
        doc_start = np.zeros(n, dtype=np.bool_)
        if self.starts:
            starts = np.concatenate(self.starts)
            doc_start[starts[starts < n]] = True
        return tokens, doc_start


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"{name}: the tokenizer has no EOS token (eos_token_id is None); documents are separated by "
            "EOS, so set tokenizer.eos_token or use the teacher's own tokenizer"
        )
    return int(eos)


def load_corpus(
    specs: Sequence[str | os.PathLike[str]] | str,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int = 512,
    text_field: str = "text",
    limit_tokens: int | None = None,
    progress: bool = True,
) -> PackedCorpus:
    """Read, tokenize and pack ``specs``. Every document is followed by EOS; ``limit_tokens`` caps
    the stream exactly and stops reading once it is reached. Raises DataError for bad specs or an
    empty corpus; data problems that are only counted are in ``result.stats.warnings()``."""
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
    if limit_tokens is not None and limit_tokens < 2:
        raise ValueError(f"limit_tokens must be None or >= 2, got {limit_tokens}")
    eos = _eos_id(tokenizer)
    sources = resolve_specs(specs)
    stats = CorpusStats(text_field=text_field)
    builder = _StreamBuilder(tokenizer, eos, limit_tokens, stats)
    with tqdm(sources, desc="tokenizing", unit="file", file=sys.stderr, disable=not progress) as bar:
        for source in bar:
            docs = source_documents(source, text_field, tokenizer, stats)
            try:
                for doc in docs:
                    builder.add(doc)
                    if builder.full:
                        break
            finally:
                docs.close()
            bar.set_postfix(docs=stats.documents, refresh=False)
            if builder.full:
                break
    tokens, doc_start = builder.finish()
    stats.documents = int(doc_start.sum())
    if tokens.shape[0] < 2:
        names = specs if isinstance(specs, (str, os.PathLike)) else ", ".join(os.fspath(s) for s in specs)
        hint = f"; {stats.warnings()[0]}" if stats.warnings() else f"; check text_field={text_field!r}"
        raise DataError(f"{names}: the corpus is empty ({tokens.shape[0]} token(s); at least 2 are needed){hint}")
    return PackedCorpus(
        tokens=tokens,
        doc_start=doc_start,
        max_seq_len=max_seq_len,
        fingerprint=corpus_fingerprint(tokens, max_seq_len),
        stats=stats,
    )


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

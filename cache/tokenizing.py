"""Documents -> tokens in the teacher's tokenizer: the one place text becomes token ids.

Documents are tokenized in batches (one call into the Rust tokenizer per batch, no per-token Python)
and every document is followed by EOS, so document boundaries survive packing. What comes out is a
stream of chunks, one per batch: ``(tokens int32 [n], starts int64 [d], loss_mask bool [n])`` with
``starts`` the offsets (within the chunk) of the first token of each document.

``loss_mask[t]`` says whether token t is *trained*: whether the next-token target that predicts it (at
position t - 1) is distilled when the build or online run uses ``--loss-on assistant``. Every token of
a plain-text document and its EOS is trained; of a chat row (:class:`~selkd.cache.chat.ChatText`)
only the tokens that overlap an assistant turn, not its EOS (nothing follows a conversation's end).

Only the token store's preparation (:mod:`selkd.cache.tokenize_units`) calls this, so a cache, an online run
and ``load_corpus`` all see the same stream.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from selkd.cache.chat import ChatText
from selkd.cache.documents import CorpusStats
from selkd.cache.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Tokenizer batches: large enough to amortise the call and let the Rust side parallelise, small enough
# that a token cap stops reading soon after it is reached and memory stays flat (the Rust encodings of
# a batch take about 135 bytes per token until their ids are copied out).
_BATCH_DOCS = 1024
_BATCH_CHARS = 1_000_000

Chunk = tuple[np.ndarray, np.ndarray, np.ndarray]  # tokens int32 [n], document starts int64 [d], loss_mask bool [n]


def eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The EOS id that ends every document; DataError if the tokenizer has none."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"{name}: the tokenizer has no EOS token (eos_token_id is None); documents are separated by "
            "EOS, so set tokenizer.eos_token or use the teacher's own tokenizer"
        )
    return int(eos)


def _scrub(doc: str, stats: CorpusStats) -> str:
    """Replace lone surrogates (JSON ``\\ud800`` escapes), which the Rust tokenizer rejects (a chat row
    keeps its spans: a surrogate in a chat row moves them by at most a few characters)."""
    try:
        doc.encode("utf-8")
        return doc
    except UnicodeEncodeError:
        stats.docs_with_replaced_bytes += 1
        text = doc.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")
        return ChatText(text, doc.spans) if isinstance(doc, ChatText) else text


def _backend(tokenizer: PreTrainedTokenizerBase) -> Any:
    """The Rust tokenizer of a fast tokenizer, when calling it directly gives the ids ``tokenizer(...)``
    gives (no truncation or padding configured on it), else None. Called directly it skips the Python
    encodings (offsets, masks) transformers builds: a third of the memory, and faster."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return None
    return backend


def _ids(docs: list[str], tokenizer: PreTrainedTokenizerBase, offsets: bool) -> tuple[list[list[int]], list[Any]]:
    """Token ids of each document, and with ``offsets`` the character range of each token ([n, 2] per
    document; a batch with a chat row needs them), else an empty list."""
    backend = _backend(tokenizer)
    if backend is not None:
        if offsets:
            encodings = backend.encode_batch(docs, add_special_tokens=False)
            return [e.ids for e in encodings], [e.offsets for e in encodings]
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # tokenizers >= 0.21: no offsets
        return [e.ids for e in encode(docs, add_special_tokens=False)], []
    kwargs: dict[str, Any] = {
        "add_special_tokens": False,
        "return_attention_mask": False,
        "return_token_type_ids": False,
        "verbose": False,  # documents longer than model_max_length are expected here
    }
    if offsets:
        if not getattr(tokenizer, "is_fast", False):
            raise DataError(
                f"{getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}: chat rows need a fast "
                "tokenizer (character offsets tell the assistant's tokens apart); load the fast one (use_fast=True)"
            )
        out = tokenizer(docs, return_offsets_mapping=True, **kwargs)
        return out["input_ids"], out["offset_mapping"]
    return tokenizer(docs, **kwargs)["input_ids"], []


def assistant_tokens(offsets: Any, spans: np.ndarray) -> np.ndarray:
    """bool [n]: which of n tokens (character ranges ``offsets`` [n, 2]) overlap one of ``spans`` [m, 2]
    (sorted, not overlapping): the last span that starts before a token ends must end after it starts."""
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if not len(spans):
        return np.zeros(len(off), np.bool_)
    k = np.searchsorted(spans[:, 0], off[:, 1], side="left") - 1
    return (k >= 0) & (spans[np.maximum(k, 0), 1] > off[:, 0]) & (off[:, 1] > off[:, 0])


def _loss_mask(docs: list[str], offsets: list[Any], ends: np.ndarray, n: int) -> np.ndarray:
    """bool [n] over a chunk's n tokens (see the module docstring): True except at a chat row's tokens
    outside its assistant spans and at its EOS. ``ends``: where each document's EOS goes."""
    if not offsets:  # no chat row in the batch: every token is trained
        return np.ones(n, np.bool_)
    parts = [
        assistant_tokens(off, doc.spans) if isinstance(doc, ChatText) else np.ones(len(off), np.bool_)
        for off, doc in zip(offsets, docs, strict=True)
    ]
    eos_trained = np.fromiter((not isinstance(d, ChatText) for d in docs), dtype=np.bool_, count=len(docs))
    return np.insert(np.concatenate(parts), ends, eos_trained)


def _encode(docs: list[str], tokenizer: PreTrainedTokenizerBase, eos: int, stats: CorpusStats) -> Chunk:
    """One batch of documents -> (tokens with EOS after each document, document start offsets, loss mask)."""
    chat = any(isinstance(d, ChatText) for d in docs)
    try:
        ids, offsets = _ids(docs, tokenizer, chat)
    except TypeError:  # a lone surrogate, which the Rust side cannot take
        docs = [_scrub(d, stats) for d in docs]
        ids, offsets = _ids(docs, tokenizer, chat)
    n_docs = len(ids)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n_docs)
    ends = np.cumsum(lengths)
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(ends[-1]))
    tokens = np.insert(flat, ends, np.int32(eos))  # EOS after every document
    # Document i starts after all earlier tokens plus one EOS per earlier document.
    starts = np.concatenate(([0], ends[:-1] + np.arange(1, n_docs, dtype=np.int64)))
    return tokens, starts, _loss_mask(docs, offsets, ends, len(tokens))


def tokenize_documents(
    docs: Iterator[str], tokenizer: PreTrainedTokenizerBase, stats: CorpusStats, cap: int | None = None
) -> Iterator[Chunk]:
    """Chunks of the token stream of ``docs`` (each document followed by EOS), one per tokenizer batch.

    ``cap`` ends the stream after exactly that many tokens (the last chunk is cut, its document starts
    past the cut dropped) and stops reading ``docs`` there: the generator is closed, so a reader that
    judges its file on close (see :func:`selkd.cache.documents.source_documents`) still does."""
    eos = eos_id(tokenizer)
    pending: list[str] = []
    chars = 0
    total = 0
    try:
        for doc in itertools.chain(docs, [None]):
            if doc is not None:
                pending.append(doc)
                chars += len(doc)
                if len(pending) < _BATCH_DOCS and chars < _BATCH_CHARS:
                    continue
            if not pending:
                break
            tokens, starts, mask = _encode(pending, tokenizer, eos, stats)
            pending, chars = [], 0
            if cap is not None and total + len(tokens) >= cap:
                keep = cap - total
                yield tokens[:keep].copy(), starts[starts < keep], mask[:keep].copy()
                return
            total += len(tokens)
            yield tokens, starts, mask
    finally:
        close = getattr(docs, "close", None)
        if close is not None:
            close()


class StreamHash:
    """The identity of a piece of the token stream: sha256 of its tokens (int32 little-endian) and of
    its document starts (int64 little-endian offsets from the piece's first token), fed chunk by chunk,
    so it does not depend on how the piece was cut into chunks or shards."""

    def __init__(self) -> None:
        self.tokens = hashlib.sha256()
        self.starts = hashlib.sha256()
        self.n_tokens = 0
        self.n_documents = 0

    def update(self, tokens: np.ndarray, starts: np.ndarray) -> None:
        """``starts``: document start offsets within ``tokens``."""
        self.tokens.update(memoryview(np.ascontiguousarray(tokens, dtype="<i4")).cast("B"))
        self.starts.update(memoryview(np.ascontiguousarray(starts + self.n_tokens, dtype="<i8")).cast("B"))
        self.n_tokens += len(tokens)
        self.n_documents += len(starts)

    def digest(self) -> str:
        return hashlib.sha256(f"{self.tokens.hexdigest()}:{self.starts.hexdigest()}".encode()).hexdigest()

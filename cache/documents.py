"""Sources -> documents: files, saved ``datasets`` directories and ``datasets:`` specs (resolved from data
specs by :mod:`selkd.cache.sources`), local or behind an fsspec URL (``s3://``), read in a deterministic
order as plain text (chat rows rendered with the tokenizer's chat template by :mod:`selkd.cache.chat`).
Everything is streamed: a file is read line by line or in Arrow batches, never held whole (except a
``.txt`` file, which is one document).

Problems in the data that are common and harmless in bulk (a row without the text field, a line of
broken JSON, undecodable bytes) are counted in :class:`CorpusStats` and reported instead of stopping
a long run; problems that make the result meaningless (nothing matches a spec, an unsupported file,
a file that is not text) raise :class:`DataError` with a one-line message that names the path and
says what to do.

A file is "not text" when more than half of its documents (rows; a ``.txt`` file is one document)
are not valid UTF-8, contain NUL bytes or are lines that do not parse as JSON: random bytes or a
binary file given by mistake would otherwise become a cache of U+FFFD and byte tokens, with only a
warning to tell. The rule is judged per file, on the rows read, so a few bad rows stay a counted
warning and reading stays streaming.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selkd.cache.chat import MESSAGES_KEY, is_chat, render_chat
from selkd.cache.errors import DataError, one_line
from selkd.cache.sources import (
    DATASETS,
    DATASETS_PREFIX,
    HF_DATASET,
    Source,
    datasets_module,
    parse_datasets_spec,
    resolve_specs,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_BOM = b"\xef\xbb\xbf"
# Tokenizer batches: large enough to amortise the call and let the Rust side parallelise, small
# enough that ``limit_tokens`` stops reading soon after the cap and memory stays flat.
_ROW_BATCH = 1024  # rows per Arrow batch for parquet / datasets


@dataclass
class CorpusStats:
    """Counters of what was read and what was skipped, so a run can report data problems at the end
    instead of failing on the first odd row of a large corpus."""

    files: int = 0  # sources opened (fewer than resolved when limit_tokens stopped early)
    documents: int = 0  # documents whose first token is in the stream
    rows_missing_field: int = 0
    first_missing: str | None = None  # "path:line" (jsonl) or "path:row" (1-based, parquet/datasets)
    bad_json_rows: int = 0
    docs_with_replaced_bytes: int = 0
    docs_with_nul: int = 0
    chat_rows: int = 0  # rows rendered with the tokenizer's chat template
    first_bad_json: str | None = None
    first_replaced: str | None = None
    first_nul: str | None = None
    text_field: str = "text"

    def warnings(self) -> list[str]:
        """Human-readable lines for the non-zero problem counters (empty when the data was clean)."""
        out: list[str] = []
        if self.rows_missing_field:
            out.append(
                f"skipped {self.rows_missing_field} row(s) without a {self.text_field!r} field or a "
                f"{MESSAGES_KEY!r} list (first at {self.first_missing}); set text_field if the text "
                "lives under another key"
            )
        if self.bad_json_rows:
            out.append(f"skipped {self.bad_json_rows} line(s) of invalid JSON (first at {self.first_bad_json})")
        if self.docs_with_replaced_bytes:
            out.append(
                f"{self.docs_with_replaced_bytes} document(s) had bytes that are not valid UTF-8, "
                f"replaced with U+FFFD (first at {self.first_replaced})"
            )
        if self.docs_with_nul:
            out.append(f"{self.docs_with_nul} document(s) contain NUL bytes (first at {self.first_nul})")
        return out

    def note(self, problem: str, where: str) -> None:
        """Count one row with ``problem`` (a key of :data:`PROBLEMS`) found at ``where``."""
        count, first, _ = PROBLEMS[problem]
        setattr(self, count, getattr(self, count) + 1)
        if getattr(self, first) is None:
            setattr(self, first, where)


#: Rows that are not text, by problem: (CorpusStats counter, CorpusStats field of the first place, what
#: the DataError of a file that is not text calls them).
PROBLEMS: dict[str, tuple[str, str, str]] = {
    "utf8": ("docs_with_replaced_bytes", "first_replaced", "not valid UTF-8"),
    "nul": ("docs_with_nul", "first_nul", "binary (NUL bytes)"),
    "json": ("bad_json_rows", "first_bad_json", "not JSON"),
}

# ----------------------------------------------------------------------------------------------------
# Reading documents
#
# Readers yield (text, replaced, row): ``text`` is None for a line that is not JSON, ``replaced`` says
# whether bytes that are not valid UTF-8 were replaced, ``row`` is the 1-based line or row (None for a
# .txt file, which is one document). Bookkeeping common to all kinds lives in source_documents.

_Doc = tuple["str | None", bool, "int | None"]


def _decode(data: bytes) -> tuple[str, bool]:
    """UTF-8 with a fallback to U+FFFD replacement; the flag says whether a replacement happened
    (strict first, so a literal U+FFFD in clean text is not miscounted)."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def _row_text(
    text: Any, messages: Any, where: Callable[[], str], tokenizer: PreTrainedTokenizerBase, stats: CorpusStats
) -> str | None:
    """The document of one row: the text field if it is a string, else a rendered chat list (from the
    text field itself or from ``messages``), else None after counting the row as missing.
    ``where`` is a zero-argument callable giving "path:line" (built only when needed)."""
    if isinstance(text, str):
        return text
    chat = text if is_chat(text) else messages if is_chat(messages) else None
    if chat is None:
        stats.rows_missing_field += 1
        if stats.first_missing is None:
            stats.first_missing = where()
        return None
    stats.chat_rows += 1
    return render_chat(chat, tokenizer, where())


def _read_txt(
    source: Source, text_field: str, tokenizer: PreTrainedTokenizerBase, stats: CorpusStats
) -> Iterator[_Doc]:
    with source.open() as fh:
        data = fh.read()
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    text, replaced = _decode(data)
    yield text, replaced, None


def _read_jsonl(
    source: Source, text_field: str, tokenizer: PreTrainedTokenizerBase, stats: CorpusStats
) -> Iterator[_Doc]:
    path = source.path
    with source.open() as raw_fh, gzip.GzipFile(fileobj=raw_fh) if source.kind == "jsonl.gz" else raw_fh as fh:
        for lineno, raw in enumerate(fh, 1):
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            if not raw.strip():
                continue
            line, replaced = _decode(raw)
            try:
                row = json.loads(line)
            except ValueError:
                yield None, False, lineno
                continue
            if isinstance(row, dict):
                text, messages = row.get(text_field), row.get(MESSAGES_KEY)
            else:
                text = messages = None
            doc = _row_text(text, messages, lambda n=lineno: f"{path}:{n}", tokenizer, stats)
            if doc is not None:
                yield doc, replaced, lineno


def _columns_for(names: Sequence[str], text_field: str, path: Path | str) -> list[str]:
    cols = list(dict.fromkeys(c for c in (text_field, MESSAGES_KEY) if c in names))
    if not cols:
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise DataError(
            f"{path}: no {text_field!r} or {MESSAGES_KEY!r} column (columns: {shown}); "
            "set text_field to the column that holds the text"
        )
    return cols


def _column_rows(
    batch: dict[str, list[Any]],
    text_field: str,
    start_row: int,
    path: Path | str,
    tokenizer: PreTrainedTokenizerBase,
    stats: CorpusStats,
) -> Iterator[_Doc]:
    """Documents of one columnar batch (Arrow strings are valid UTF-8, so nothing is replaced)."""
    texts = batch.get(text_field)
    messages = batch.get(MESSAGES_KEY) if text_field != MESSAGES_KEY else None
    n = len(texts if texts is not None else messages or [])
    for i in range(n):
        text = texts[i] if texts is not None else None
        if isinstance(text, str):  # fast path, the common case
            yield text, False, start_row + i + 1
            continue
        msg = messages[i] if messages is not None else None
        doc = _row_text(text, msg, lambda r=start_row + i + 1: f"{path}:{r}", tokenizer, stats)
        if doc is not None:
            yield doc, False, start_row + i + 1


def parquet_row_groups(source: Source) -> list[int]:
    """Rows of each row group of a parquet file (from its footer); DataError if it is not parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with source.open() as fh:
            meta = pq.ParquetFile(fh).metadata
            return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    except pa.ArrowException as err:
        raise DataError(
            f"{source.path}: cannot read the parquet file ({one_line(err)}); check that it is not corrupt"
        ) from err


def _read_parquet(
    source: Source, text_field: str, tokenizer: PreTrainedTokenizerBase, stats: CorpusStats
) -> Iterator[_Doc]:
    """The whole file, or row group ``source.part`` (rows numbered from ``source.first_row + 1``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = source.path
    try:
        with source.open() as fh:
            pf = pq.ParquetFile(fh)
            columns = _columns_for(pf.schema_arrow.names, text_field, path)
            row = source.first_row
            groups = None if source.part is None else [source.part]
            for batch in pf.iter_batches(batch_size=_ROW_BATCH, columns=columns, row_groups=groups):
                cols = {c: batch.column(c).to_pylist() for c in columns}
                yield from _column_rows(cols, text_field, row, path, tokenizer, stats)
                row += batch.num_rows
    except pa.ArrowException as err:
        raise DataError(
            f"{path}: cannot read the parquet file ({one_line(err)}); check that it is not corrupt"
        ) from err


def _only_split(splits_of: Any, problem: Callable[[str, str], str]) -> Any:
    """The one split of a dataset dictionary; a DataError worded by ``problem(names, first)`` when it has
    none or several."""
    splits = sorted(splits_of)
    if len(splits) != 1:
        raise DataError(problem(", ".join(splits) or "(none)", splits[0] if splits else "train"))
    return splits_of[splits[0]]


def load_saved_dataset(source: Source) -> Any:
    """The ``datasets.Dataset`` of a ``save_to_disk`` directory (memory-mapped, not read), a
    DatasetDict's only split; DataError naming the directory otherwise."""
    path = source.path
    datasets = datasets_module(f"{path}: reading a directory saved by datasets.save_to_disk")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"{path}: cannot load the saved dataset ({one_line(err)})") from err
    if isinstance(ds, datasets.DatasetDict):
        return _only_split(
            ds,
            lambda names, first: (
                f"{path}: is a DatasetDict with splits {names}; pass one split directory "
                f"instead, e.g. {Path(path) / first}"
            ),
        )
    return ds


def _read_saved_dataset(
    source: Source, text_field: str, tokenizer: PreTrainedTokenizerBase, stats: CorpusStats
) -> Iterator[_Doc]:
    """The whole dataset, or contiguous shard ``source.part`` of ``source.n_parts``."""
    path = source.path
    ds = load_saved_dataset(source)
    columns = _columns_for(ds.column_names, text_field, path)
    ds = ds.select_columns(columns).with_format(None)
    if source.part is not None:
        ds = ds.shard(num_shards=source.n_parts, index=source.part, contiguous=True)
    row = source.first_row
    for batch in ds.iter(batch_size=_ROW_BATCH):
        yield from _column_rows(batch, text_field, row, path, tokenizer, stats)
        row += len(batch[columns[0]])


def load_streaming_dataset(source: Source) -> Any:
    """The ``datasets.IterableDataset`` of a ``datasets:`` spec (one split), loaded from local files."""
    spec = str(source.path)
    datasets = datasets_module(f"{spec}: reading a {DATASETS_PREFIX} spec")
    path, args = parse_datasets_spec(spec)
    split = args.pop("split", None)
    try:
        ds = datasets.load_dataset(
            str(Path(path).expanduser()) if Path(path).expanduser().exists() else path,
            split=split,
            streaming=True,
            **args,
        )
    except Exception as err:
        raise DataError(f"{spec}: cannot load the dataset ({one_line(err)})") from err
    if isinstance(ds, datasets.IterableDatasetDict):
        return _only_split(
            ds, lambda names, first: f"{spec}: the dataset has splits {names}; choose one with ?split={first}"
        )
    return ds


def _read_datasets(
    source: Source, text_field: str, tokenizer: PreTrainedTokenizerBase, stats: CorpusStats
) -> Iterator[_Doc]:
    """Rows of a ``datasets:`` spec streamed in batches, or of its shard ``source.part`` of ``n_parts``
    (rows numbered from 1 within the shard)."""
    ds = load_streaming_dataset(source)
    if source.part is not None:
        ds = ds.shard(num_shards=source.n_parts, index=source.part)
    where = source.label
    row = 0
    try:
        for batch in ds.iter(batch_size=_ROW_BATCH):
            if row == 0:
                _columns_for(list(batch), text_field, where)
            yield from _column_rows(batch, text_field, row, where, tokenizer, stats)
            row += len(next(iter(batch.values()), []))
    except DataError:
        raise
    except Exception as err:  # errors of the dataset's builder while reading its files
        raise DataError(f"{where}: cannot read the dataset ({one_line(err)})") from err


_READERS = {
    "txt": _read_txt,
    "jsonl": _read_jsonl,
    "jsonl.gz": _read_jsonl,
    "parquet": _read_parquet,
    HF_DATASET: _read_saved_dataset,
    DATASETS: _read_datasets,
}


def _problem(text: str | None, replaced: bool) -> str | None:
    """What makes a row not text (a key of :data:`PROBLEMS`), or None for a good row."""
    if text is None:
        return "json"
    if replaced:
        return "utf8"
    return "nul" if "\x00" in text else None


@dataclass
class _FileCheck:
    """The not-text rule of one file: how many documents it held and how many were not text."""

    source: Source
    documents: int = 0
    not_text: int = 0
    first: str | None = None
    problems: set[str] = field(default_factory=set)

    def bad(self, problem: str, where: str) -> None:
        self.not_text += 1
        self.first = self.first or where
        self.problems.add(problem)

    def judge(self) -> None:
        if 2 * self.not_text <= self.documents:
            return
        what = " or ".join(PROBLEMS[p][2] for p in PROBLEMS if p in self.problems)
        place = f" (first at {self.first})" if self.first != self.source.label else ""
        raise DataError(
            f"{self.source.label}: not a text file: {self.not_text} of {self.documents} document(s) are {what}"
            f"{place}; a file is refused when more than half of its documents are: convert it to UTF-8 text or "
            "leave it out of --data"
        )


def source_documents(
    source: Source, text_field: str, tokenizer: PreTrainedTokenizerBase, stats: CorpusStats
) -> Iterator[str]:
    """Non-empty documents of one source, with the shared bookkeeping and I/O errors turned into
    DataError. Empty documents are dropped (they would only add a lone EOS). A file that is not text
    (see the module docstring) raises DataError once read, or when closed early (``limit_tokens``)."""
    stats.files += 1
    reader = _READERS[source.kind]
    check = _FileCheck(source)
    try:
        for text, replaced, row in reader(source, text_field, tokenizer, stats):
            check.documents += 1
            problem = _problem(text, replaced)
            if problem is not None:
                where = source.label if row is None else f"{source.label}:{row}"
                check.bad(problem, where)
                stats.note(problem, where)
            if text:
                stats.documents += 1
                yield text
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(
            f"{source.label}: cannot read the file ({one_line(err)}); check that it is readable and not corrupt"
        ) from err
    except GeneratorExit:
        check.judge()
        raise
    check.judge()


def iter_documents(
    specs: Sequence[str | os.PathLike[str]] | Sequence[Source] | str,
    text_field: str,
    tokenizer: PreTrainedTokenizerBase,
    stats: CorpusStats,
) -> Iterator[str]:
    """All documents of ``specs`` in order, as text. ``stats`` is updated in place as rows are read;
    the tokenizer is needed only to render chat rows."""
    if isinstance(specs, (list, tuple)) and specs and all(isinstance(s, Source) for s in specs):
        sources: list[Source] = list(specs)  # type: ignore[arg-type]
    else:
        sources = resolve_specs(specs)  # type: ignore[arg-type]
    for source in sources:
        yield from source_documents(source, text_field, tokenizer, stats)

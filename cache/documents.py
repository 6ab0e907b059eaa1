"""Data specs -> documents: files, directories, globs, saved ``datasets`` directories and ``datasets``
dataset directories, local or behind an fsspec URL (``s3://``), read in a deterministic order as plain
text (chat rows rendered with the tokenizer's chat template, as :class:`ChatText`, which carries where
the assistant's turns are in the text). Everything is streamed: a file is read
line by line or in Arrow batches, never held whole (except a ``.txt`` file, which is one document).

A spec is a local path, directory or glob; an fsspec URL (``s3://bucket/corpus/``, a glob such as
``s3://bucket/corpus/*.jsonl.gz``; options such as ``endpoint_url`` come from ``--storage-option``); or
``datasets:PATH[?name=CONFIG&split=SPLIT&data_dir=DIR&data_files=GLOB]``, a dataset directory (a
downloaded Hub dataset repository, a directory of data files) or a packaged builder (``json``,
``parquet``, ``text`` ... with ``data_files``) loaded by ``datasets.load_dataset(..., streaming=True)``
from local files only.

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

import glob
import gzip
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from selkd.cache.errors import SelkdError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: File kinds by suffix, longest first so ``.jsonl.gz`` wins over any shorter match.
SUPPORTED_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".jsonl.gz", "jsonl.gz"),
    (".jsonl", "jsonl"),
    (".parquet", "parquet"),
    (".txt", "txt"),
)
#: Kind of a directory written by ``datasets.Dataset.save_to_disk``.
HF_DATASET = "hf_dataset"
#: Kind of a ``datasets:`` spec, read with ``datasets.load_dataset(..., streaming=True)``.
DATASETS = "datasets"
DATASETS_PREFIX = "datasets:"
#: What a ``datasets:`` spec may pass to ``load_dataset`` after ``?``.
DATASETS_QUERY = ("name", "split", "data_dir", "data_files")
#: The key of a chat row's message list.
MESSAGES_KEY = "messages"

_SUPPORTED_TEXT = ".txt, .jsonl, .jsonl.gz, .parquet or a directory saved by datasets.save_to_disk"
_DATASET_MARKERS = ("dataset_info.json", "state.json")
_DATASET_DICT_MARKER = "dataset_dict.json"
_BOM = b"\xef\xbb\xbf"
_GLOB_CHARS = frozenset("*?[")
# Tokenizer batches: large enough to amortise the call and let the Rust side parallelise, small
# enough that ``limit_tokens`` stops reading soon after the cap and memory stays flat.
_ROW_BATCH = 1024  # rows per Arrow batch for parquet / datasets


class DataError(SelkdError):
    """A user-facing data problem; the message is one line naming the path and what to do."""


def _one_line(err: BaseException | str) -> str:
    """Collapse an exception text to one line so DataError messages stay one line."""
    return " ".join(str(err).split())


@dataclass(frozen=True)
class Source:
    """One readable input, or one unit of it (see :mod:`selkd.cache.units`): a file, a saved ``datasets``
    directory or a ``datasets:`` spec; ``part`` narrows it to a parquet row group or to shard ``part`` of
    ``n_parts`` of a dataset. ``path`` is a local ``Path``, the URL of a remote file, or the spec of a
    ``datasets:`` source; ``options`` are the fsspec storage options of a URL."""

    path: Path | str
    kind: str  # "txt" | "jsonl" | "jsonl.gz" | "parquet" | HF_DATASET | DATASETS
    part: int | None = None
    n_parts: int | None = None
    first_row: int = 0  # rows of the file before this unit: messages count rows from 1 per file
    size: int | None = field(default=None, compare=False)  # bytes of a file, to notice a changed input
    options: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def label(self) -> str:
        """What messages call it: the path, and which shard of a dataset."""
        if self.n_parts is not None and self.n_parts > 1:
            return f"{self.path} (shard {self.part} of {self.n_parts})"
        return str(self.path)

    def open(self) -> Any:
        """The file as a binary file object (local, or through fsspec for a URL)."""
        if isinstance(self.path, Path):
            return open(self.path, "rb")
        from selkd.cache.remote_data import open_url

        return open_url(self.path, self.options)


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
# Resolving specs


def _kind_of(name: str) -> str | None:
    lower = name.lower()
    for suffix, kind in SUPPORTED_SUFFIXES:
        if lower.endswith(suffix):
            return kind
    return None


def _saved_dataset_kind(path: Path) -> str | None:
    """Return "dataset" / "dataset_dict" for a ``save_to_disk`` directory, None for a plain directory."""
    if any((path / m).is_file() for m in _DATASET_MARKERS):
        return "dataset"
    if (path / _DATASET_DICT_MARKER).is_file():
        return "dataset_dict"
    return None


def _collect_dir(root: Path) -> list[Source]:
    """Supported files under ``root`` (recursively, hidden entries skipped, sorted by relative
    path); a saved ``datasets`` directory counts as one source and is not descended into."""
    if _saved_dataset_kind(root):
        return [Source(root, HF_DATASET)]
    found: list[Source] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink cycle
            dirnames.clear()
            continue
        seen_dirs.add(real)
        if here != root and _saved_dataset_kind(here):
            found.append(Source(here, HF_DATASET))
            dirnames.clear()
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            kind = _kind_of(name)
            if kind is not None:
                found.append(_file_source(here / name, kind))
    found.sort(key=lambda s: Path(s.path).relative_to(root).parts)
    return found


def _file_source(path: Path, kind: str) -> Source:
    try:
        size = path.stat().st_size
    except OSError:
        size = None  # reading it says what is wrong
    return Source(path, kind, size=size)


def _expand(spec: str) -> list[Source]:
    if not spec.strip():
        raise DataError("an empty data spec was given; pass a file, directory or glob")
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        found = _collect_dir(path)
        if not found:
            raise DataError(f"{spec}: directory has no supported files (expected {_SUPPORTED_TEXT})")
        return found
    if path.exists():
        kind = _kind_of(path.name)
        if kind is None:
            raise DataError(f"{spec}: unsupported file type; use {_SUPPORTED_TEXT}")
        return [_file_source(path, kind)]
    if _GLOB_CHARS.intersection(spec):
        matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
        if not matches:
            raise DataError(f"{spec}: the pattern matches nothing; check the path (and quote it in the shell)")
        found = []
        for m in matches:
            p = Path(m)
            if p.is_dir():
                found.extend(_collect_dir(p))
            elif (kind := _kind_of(p.name)) is not None:
                found.append(_file_source(p, kind))
        if not found:
            raise DataError(
                f"{spec}: the pattern matches {len(matches)} path(s) but no supported files "
                f"(expected {_SUPPORTED_TEXT})"
            )
        return found
    raise DataError(f"{spec}: no such file or directory; check the path")


def _datasets_spec(spec: str) -> Source:
    """A ``datasets:PATH[?query]`` spec, checked without loading it: PATH must be a local directory or
    file, or a packaged builder name (``json``, ``parquet`` ...), so that nothing is fetched from the Hub."""
    path, query = parse_datasets_spec(spec)
    if not Path(path).expanduser().exists():
        _datasets_module(f"{spec}: reading a {DATASETS_PREFIX} spec")
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES as packaged

        if path not in packaged:
            raise DataError(
                f"{spec}: {path} is neither a local directory nor a packaged builder (json, parquet, text, ...); "
                "datasets are read offline: download the dataset first (e.g. huggingface-cli download --repo-type "
                f"dataset NAME --local-dir DIR) and pass {DATASETS_PREFIX}DIR"
            )
        if "data_files" not in query:
            raise DataError(f"{spec}: the packaged builder {path!r} needs ?data_files=GLOB")
    return Source(spec, DATASETS)


def parse_datasets_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``datasets:PATH?k=v&...`` -> (PATH, {k: v}); only the keys of :data:`DATASETS_QUERY` are taken."""
    from urllib.parse import parse_qsl

    path, _, query = spec.removeprefix(DATASETS_PREFIX).partition("?")
    if not path:
        raise DataError(f"{spec}: name a dataset directory after {DATASETS_PREFIX!r}")
    args = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(args) - set(DATASETS_QUERY))
    if unknown:
        raise DataError(f"{spec}: unknown key(s) {', '.join(unknown)}; use {', '.join(DATASETS_QUERY)}")
    return path, args


def _expand_spec(spec: str, storage_options: dict[str, Any] | None) -> list[Source]:
    if spec.startswith(DATASETS_PREFIX):
        return [_datasets_spec(spec)]
    from selkd.cache.store import is_url

    if is_url(spec):
        from selkd.cache.remote_data import expand_url

        return expand_url(spec, storage_options or {})
    return _expand(spec)


def resolve_specs(
    specs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> list[Source]:
    """Expand files, directories, globs, URLs and ``datasets:`` specs into sources in a deterministic
    order: the order of the specs, sorted within each directory or glob. A source reached twice is kept
    once (first place). ``storage_options`` are fsspec options for URLs (s3: ``endpoint_url``, ``key``...)."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    if not specs:
        raise DataError("no data given: pass at least one file, directory or glob")
    out: list[Source] = []
    seen: set[str] = set()
    for spec in specs:
        for src in _expand_spec(os.fspath(spec), storage_options):
            key = os.path.realpath(src.path) if isinstance(src.path, Path) else src.path
            if key not in seen:
                seen.add(key)
                out.append(src)
    return out


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


def _is_chat(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) and "role" in m for m in value)


class ChatText(str):
    """A chat row rendered with the tokenizer's chat template: the text, and ``spans``, the character
    ranges ``[start, end)`` of the assistant's turns in it (int64 [n, 2], sorted, not overlapping). A
    token of the text that overlaps a span is an assistant token (:mod:`selkd.cache.tokenizing`)."""

    spans: np.ndarray

    def __new__(cls, text: str, spans: np.ndarray) -> ChatText:
        out = super().__new__(cls, text)
        out.spans = spans
        return out


_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _template(tokenizer: PreTrainedTokenizerBase, where: str) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        raise DataError(
            f"{where}: row has a chat {MESSAGES_KEY!r} list but the tokenizer has no chat template; "
            "use a tokenizer with a chat template or pre-render the rows into the text field"
        )
    return template if isinstance(template, str) else str(template)


def _generation_spans(messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """The assistant spans a template with ``{% generation %}`` markers gives: the character ranges of
    the tokens inside them."""
    out = tokenizer.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        tokenizer_kwargs={"return_offsets_mapping": True},
    )
    offsets = np.asarray(out["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    return offsets[np.asarray(out["assistant_masks"], dtype=np.bool_)]


def _turn_spans(
    messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, text: str, where: str
) -> np.ndarray:
    """The assistant spans of a template without generation markers: assistant turn i spans from the
    end of the conversation before it rendered with the generation prompt to the end of the
    conversation up to it (so its closing tokens, e.g. an end-of-turn marker, are trained too)."""
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(prompt) and upto.startswith(prompt)):
            raise DataError(
                f"{where}: the chat template renders the conversation before assistant turn {i} differently from "
                "the whole conversation, so its prompt and response cannot be told apart; use a template with "
                "{% generation %} markers"
            )
        end = len(os.path.commonprefix([upto, text]))  # noqa: RUF071 (characters, as meant)
        if end > len(prompt):
            spans.append((len(prompt), end))
    return np.array(spans, dtype=np.int64).reshape(-1, 2)


def _render_chat(messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, where: str) -> ChatText:
    """The rendered row and its assistant spans: from the template's generation markers where it has
    them, else from rendering the conversation up to each assistant turn."""
    template = _template(tokenizer, where)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        if not isinstance(text, str):
            raise DataError(f"{where}: the chat template returned {type(text).__name__}, expected text")
        if _GENERATION_MARKER.search(template):
            spans = _generation_spans(messages, tokenizer)
        else:
            spans = _turn_spans(messages, tokenizer, text, where)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{where}: the tokenizer's chat template failed on this row: {_one_line(err)}") from err
    return ChatText(text, spans)


def _row_text(
    text: Any, messages: Any, where: Callable[[], str], tokenizer: PreTrainedTokenizerBase, stats: CorpusStats
) -> str | None:
    """The document of one row: the text field if it is a string, else a rendered chat list (from the
    text field itself or from ``messages``), else None after counting the row as missing.
    ``where`` is a zero-argument callable giving "path:line" (built only when needed)."""
    if isinstance(text, str):
        return text
    chat = text if _is_chat(text) else messages if _is_chat(messages) else None
    if chat is None:
        stats.rows_missing_field += 1
        if stats.first_missing is None:
            stats.first_missing = where()
        return None
    stats.chat_rows += 1
    return _render_chat(chat, tokenizer, where())


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
            f"{source.path}: cannot read the parquet file ({_one_line(err)}); check that it is not corrupt"
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
            f"{path}: cannot read the parquet file ({_one_line(err)}); check that it is not corrupt"
        ) from err


def _datasets_module(what: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{what} needs the datasets package: pip install selkd[datasets]") from None
    return datasets


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
    datasets = _datasets_module(f"{path}: reading a directory saved by datasets.save_to_disk")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"{path}: cannot load the saved dataset ({_one_line(err)})") from err
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
    datasets = _datasets_module(f"{spec}: reading a {DATASETS_PREFIX} spec")
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
        raise DataError(f"{spec}: cannot load the dataset ({_one_line(err)})") from err
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
        raise DataError(f"{where}: cannot read the dataset ({_one_line(err)})") from err


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
            f"{source.label}: cannot read the file ({_one_line(err)}); check that it is readable and not corrupt"
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

"""Data specs -> sources: which files and datasets a spec names, in a deterministic order, checked before
anything is read (:mod:`selkd.cache.documents` reads them).

A spec is a local path, directory or glob; an fsspec URL (``s3://bucket/corpus/``, a glob such as
``s3://bucket/corpus/*.jsonl.gz``; options such as ``endpoint_url`` come from ``--storage-option``); or
``datasets:PATH[?name=CONFIG&split=SPLIT&data_dir=DIR&data_files=GLOB]``, a dataset directory (a
downloaded Hub dataset repository, a directory of data files) or a packaged builder (``json``,
``parquet``, ``text`` ... with ``data_files``) loaded by ``datasets.load_dataset(..., streaming=True)``
from local files only. Nothing matching a spec, or an unsupported file, raises :class:`DataError` with a
one-line message that names the spec and says what to do.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selkd.cache.errors import DataError

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

_SUPPORTED_TEXT = ".txt, .jsonl, .jsonl.gz, .parquet or a directory saved by datasets.save_to_disk"
_DATASET_MARKERS = ("dataset_info.json", "state.json")
_DATASET_DICT_MARKER = "dataset_dict.json"
_GLOB_CHARS = frozenset("*?[")


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


def datasets_module(what: str) -> Any:
    """The ``datasets`` package, imported on first use (it is an optional dependency); DataError saying
    ``what`` needs it and how to install it when it is missing."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{what} needs the datasets package: pip install selkd[datasets]") from None
    return datasets


def _datasets_spec(spec: str) -> Source:
    """A ``datasets:PATH[?query]`` spec, checked without loading it: PATH must be a local directory or
    file, or a packaged builder name (``json``, ``parquet`` ...), so that nothing is fetched from the Hub."""
    path, query = parse_datasets_spec(spec)
    if not Path(path).expanduser().exists():
        datasets_module(f"{spec}: reading a {DATASETS_PREFIX} spec")
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

"""Data specs behind fsspec URLs (``s3://bucket/corpus/``, ``gs://...``, ``memory://...``): listing
directories and globs on the remote filesystem, and opening files for streaming reads.

The rules are those of local specs (:mod:`selkd.cache.sources`): a directory is read recursively in
sorted order of relative paths, hidden entries skipped; a glob expands to its sorted matches; only the
supported file kinds are read. Storage options (``endpoint_url``, ``key``, ``secret`` ...) are the
``--storage-option`` values; for s3 the standard AWS environment (``AWS_ENDPOINT_URL`` ...) also works,
as botocore reads it. Directories written by ``datasets.save_to_disk`` are read from local disk only.
"""

from __future__ import annotations

from typing import Any

from selkd.cache.errors import DataError, one_line
from selkd.cache.sources import (
    _DATASET_DICT_MARKER,
    _DATASET_MARKERS,
    _GLOB_CHARS,
    _SUPPORTED_TEXT,
    Source,
    _kind_of,
)


def filesystem(url: str, options: dict[str, Any] | None) -> tuple[Any, str]:
    """(fsspec filesystem, path on it) of ``url``; DataError naming the URL when it cannot be opened."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **(options or {}))
    except ImportError as err:
        raise DataError(
            f"{url}: the filesystem for this URL is not installed ({one_line(err)}); for s3:// run "
            "`pip install selkd[s3]`"
        ) from None
    except (ValueError, TypeError) as err:
        raise DataError(f"{url}: cannot open it ({one_line(err)}); check the URL and --storage-option") from err


def open_url(url: str, options: dict[str, Any] | None) -> Any:
    """A binary file object reading ``url`` (buffered, read ahead in blocks)."""
    fs, path = filesystem(url, options)
    return fs.open(path, "rb")


def _is_dataset_dir(names: set[str]) -> bool:
    return bool(names & {*_DATASET_MARKERS, _DATASET_DICT_MARKER})


def _collect_remote_dir(fs: Any, root: str, spec: str, options: dict[str, Any]) -> list[Source]:
    """Supported files below ``root`` (recursively, hidden entries skipped, sorted by relative path)."""
    root = root.rstrip("/")
    found: list[tuple[tuple[str, ...], Source]] = []
    by_dir: dict[tuple[str, ...], set[str]] = {}
    for path, info in fs.find(root, detail=True).items():
        parts = tuple(path[len(root) :].strip("/").split("/"))
        if any(p.startswith(".") for p in parts):
            continue
        by_dir.setdefault(parts[:-1], set()).add(parts[-1])
        kind = _kind_of(parts[-1])
        if kind is not None:
            found.append((parts, Source(fs.unstrip_protocol(path), kind, size=info.get("size"), options=options)))
    saved = sorted(d for d, names in by_dir.items() if _is_dataset_dir(names))
    if saved:
        where = fs.unstrip_protocol(f"{root}/{'/'.join(saved[0])}".rstrip("/"))
        raise DataError(
            f"{spec}: {where} is a directory saved by datasets.save_to_disk, which selkd reads from local disk "
            "only; copy it to local disk, or store the rows as .parquet or .jsonl.gz files"
        )
    found.sort(key=lambda item: item[0])
    return [source for _, source in found]


def _hidden_match(pattern: str, match: str) -> bool:
    """Whether a wildcard matched a hidden name (as Python's glob never lets it): a component starting
    with "." after the pattern's fixed leading directories."""
    fixed = 0
    for part in pattern.split("/"):
        if _GLOB_CHARS.intersection(part):
            break
        fixed += 1
    return any(p.startswith(".") for p in match.split("/")[fixed:])


def expand_url(spec: str, options: dict[str, Any]) -> list[Source]:
    """The sources of one URL spec: a file, a directory (recursive) or a glob, in a deterministic order."""
    fs, root = filesystem(spec, options)
    try:
        if _GLOB_CHARS.intersection(root):
            matches = [m for m in sorted(fs.glob(root)) if not _hidden_match(root, m)]
            if not matches:
                raise DataError(f"{spec}: the pattern matches nothing; check the URL (and quote it in the shell)")
            found: list[Source] = []
            for match in matches:
                if fs.isdir(match):
                    found.extend(_collect_remote_dir(fs, match, spec, options))
                elif (kind := _kind_of(match)) is not None:
                    found.append(Source(fs.unstrip_protocol(match), kind, size=fs.size(match), options=options))
            if not found:
                raise DataError(
                    f"{spec}: the pattern matches {len(matches)} path(s) but no supported files "
                    f"(expected {_SUPPORTED_TEXT})"
                )
            return found
        if fs.isdir(root):
            found = _collect_remote_dir(fs, root, spec, options)
            if not found:
                raise DataError(f"{spec}: directory has no supported files (expected {_SUPPORTED_TEXT})")
            return found
        if fs.isfile(root):
            kind = _kind_of(root)
            if kind is None:
                raise DataError(f"{spec}: unsupported file type; use {_SUPPORTED_TEXT}")
            return [Source(spec, kind, size=fs.size(root), options=options)]
    except DataError:
        raise
    except PermissionError as err:
        raise DataError(f"{spec}: access denied ({one_line(err)}); check the credentials (--storage-option)") from err
    except Exception as err:
        raise DataError(
            f"{spec}: cannot list it ({type(err).__name__}: {one_line(err)}); check the URL, the endpoint and the "
            "credentials (--storage-option key=... secret=... endpoint_url=..., or the AWS environment)"
        ) from err
    raise DataError(f"{spec}: no such file or directory; check the URL")

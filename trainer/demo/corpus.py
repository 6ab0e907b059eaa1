"""The demo's corpus: the standard library's sources or the user's text, cut into rows and split."""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Sequence
from pathlib import Path

from selkd.trainer.demo.settings import CHUNK_CHARS, STDLIB_EXCLUDED_DIRS


def stdlib_documents(max_files: int | None = None, max_bytes: int | None = None) -> list[tuple[str, str]]:
    """``(relative path, source)`` of the interpreter's standard-library ``.py`` files, test suites,
    IDLE and installed packages excluded: real text present on every machine, sorted by path so the
    same interpreter always gives the same list.

    ``max_bytes`` bounds the total size (UTF-8): files are taken in path order, skipping any that would
    overflow the budget, so the corpus fills it closely even when one module is large."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS)
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    out: list[tuple[str, str]] = []
    total = 0
    for p in sorted(found, key=lambda p: p.relative_to(root).as_posix()):
        if max_files is not None and len(out) >= max_files:
            break
        if max_bytes is not None:
            if max_bytes - total < 256:
                break
            try:
                if total + p.stat().st_size > max_bytes:
                    continue
            except OSError:
                continue
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            out.append((p.relative_to(root).as_posix(), text))
            total += len(text.encode("utf-8"))
    return out


def user_documents(specs: Sequence[str], text_field: str, max_chars: int | None = None) -> list[tuple[str, str]]:
    """Documents of ``--data`` (the formats ``selkd-cache build`` reads), named by position. Reading
    stops after ``max_chars``: the demo uses a few MB, however large the corpus. Chat rows are refused
    (their rendering needs a tokenizer with a chat template, and the demo trains its own)."""
    from selkd.cache.documents import CorpusStats, iter_documents

    stats = CorpusStats(text_field=text_field)
    out: list[tuple[str, str]] = []
    total = 0
    for doc in iter_documents(list(specs), text_field, None, stats):  # type: ignore[arg-type]
        if doc.strip():
            out.append((f"doc{len(out)}", doc))
            total += len(doc)
            if max_chars is not None and total >= max_chars:
                break
    return out


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Split at line ends into pieces of at most ``max_chars`` (a longer line is its own piece), so a
    corpus row is never one 100 KB module."""
    pieces: list[str] = []
    cur: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        if cur and size + len(line) > max_chars:
            pieces.append("".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += len(line)
    if cur:
        pieces.append("".join(cur))
    return [p for p in pieces if p.strip()]


def split_documents(docs: Sequence[tuple[str, str]], kd_chars: int, extra_chars: int) -> tuple[list[str], list[str]]:
    """Rows of the KD corpus (about ``kd_chars``) and of the pretraining-only text (about
    ``extra_chars``). Documents are shuffled by a hash of their name (deterministic, and the KD corpus
    is not one package's alphabetical prefix) and cut into rows at line ends; a document's rows stay in
    order, so sequences keep their context, and only the document at the boundary is split."""
    order = sorted(docs, key=lambda d: hashlib.sha1(d[0].encode()).hexdigest())
    kd: list[str] = []
    extra: list[str] = []
    kd_size = extra_size = 0
    for _, text in order:
        for row in chunk_text(text, CHUNK_CHARS):
            if kd_size < kd_chars:
                kd.append(row)
                kd_size += len(row)
            elif extra_size < extra_chars:
                extra.append(row)
                extra_size += len(row)
            else:
                return kd, extra
    return kd, extra


def write_rows(path: Path, rows: Sequence[str]) -> str:
    """Write ``{"text": ...}`` rows unless the file already holds exactly them; returns their hash."""
    body = "".join(json.dumps({"text": r}, ensure_ascii=False) + "\n" for r in rows).encode()
    digest = hashlib.sha256(body).hexdigest()
    try:
        same = path.stat().st_size == len(body) and hashlib.sha256(path.read_bytes()).hexdigest() == digest
    except OSError:
        same = False
    if not same:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(body)
        tmp.replace(path)
    return digest

"""`selkd-cache info`: what a cache holds and what it costs, from metadata alone (no array reads)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from selkd.cache.reader import CacheReader
from selkd.cache.tokens import CACHE_TOKENS_PREFIX


@dataclass(frozen=True)
class CacheInfo:
    format: str
    format_version: int
    teacher: str
    tokenizer_fingerprint: str
    vocab_size: int  # the teacher's head rows
    num_classes: int  # the real classes targets cover (the tokenizer's length); the rest of the head is padding
    classes: str
    temperature: float
    max_seq_len: int
    sequences_total: int  # sequences of the packed corpus
    sequences_stored: int  # train + eval sequences with teacher targets in committed parts
    sequences_train: int
    sequences_eval: int
    sequences_scored: int | None  # sequences scored for sample selection (None: no selection)
    sequences_skipped: int  # sequences not stored: none of their targets trains (--loss-on assistant)
    loss_on: str  # which positions train: assistant or all (format.trained_targets)
    sample_selection: str | None
    positions_stored: int  # target positions in committed parts
    positions_trained: int  # of those, the ones whose target trains (the rest: prompt positions of chat rows)
    positions_corpus: int  # target positions of the whole corpus
    bytes_on_disk: int
    bytes_per_stored_position: float | None
    bytes_per_corpus_position: float | None
    full_fp16_bytes: int  # what full fp16 logits of the whole corpus would take
    saving_vs_full_fp16: float | None  # full_fp16_bytes / bytes_on_disk
    mean_teacher_entropy: float | None
    mean_unique_ids: float | None
    mean_kept_mass: float | None
    mean_padding_mass: float | None  # teacher mass on padded head rows per position (None: not recorded)
    max_padding_mass: float | None
    parts_committed: int
    parts_incomplete: int
    finalized: bool

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def __repr__(self) -> str:
        return "CacheInfo(" + ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)) + ")"

    def __str__(self) -> str:
        def num(x: float | None, spec: str = ",.1f") -> str:
            return "n/a" if x is None else format(x, spec)

        lines = [
            f"format          {self.format} v{self.format_version}",
            f"teacher         {self.teacher}",
            f"tokenizer       {self.tokenizer_fingerprint[:16]}  {self.num_classes:,} classes, "
            f"teacher head {self.vocab_size:,}",
            f"classes         {self.classes}  (temperature {self.temperature:g}, max_seq_len {self.max_seq_len})",
            f"sequences       {self.sequences_stored:,} stored of {self.sequences_total:,} "
            f"(train {self.sequences_train:,}, eval {self.sequences_eval:,}); {self.sequences_skipped:,} skipped "
            "(no assistant token)",
        ]
        if self.sample_selection:
            lines.append(f"selection       {self.sample_selection}; {self.sequences_scored or 0:,} sequences scored")
        lines += [
            f"positions       {self.positions_stored:,} stored of {self.positions_corpus:,} in the corpus; "
            f"{self.positions_trained:,} trained (--loss-on {self.loss_on})",
            f"bytes on disk   {self.bytes_on_disk:,} ({human_bytes(self.bytes_on_disk)})",
            f"bytes/position  {num(self.bytes_per_stored_position)} per stored, "
            f"{num(self.bytes_per_corpus_position)} per corpus position",
            f"vs fp16 logits  {human_bytes(self.full_fp16_bytes)} -> {num(self.saving_vs_full_fp16, ',.0f')}x smaller",
            f"teacher entropy {num(self.mean_teacher_entropy, '.3f')} nats (mean)",
        ]
        if self.mean_unique_ids is not None:
            lines.append(f"unique ids      {self.mean_unique_ids:.2f} per position (mean)")
        if self.mean_kept_mass is not None:
            lines.append(f"kept mass       {self.mean_kept_mass:.4f} per position (mean)")
        if self.max_padding_mass is not None:
            lines.append(
                f"padding mass    {self.mean_padding_mass:.3g} mean, {self.max_padding_mass:.3g} max per position "
                "(teacher mass on padded head rows, dropped from the targets)"
            )
        state = "finalized" if self.finalized else "NOT finalized"
        lines.append(f"parts           {self.parts_committed} committed, {self.parts_incomplete} incomplete ({state})")
        return "\n".join(lines)


def human_bytes(n: float) -> str:
    """``n`` bytes for people: ``512 B``, ``3.4 MiB``, ``1.2 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n):,} B"
        n /= 1024
    return f"{n:.1f} PiB"


def cache_info(reader: CacheReader) -> CacheInfo:
    h = reader.header
    recs = [p.record for p in reader.parts]
    positions = sum(r["n_targets"] for r in recs)
    corpus_positions = int(h["data"]["n_tokens"]) - int(h["data"]["n_sequences"])
    on_disk = reader.storage.size_bytes("") - reader.storage.size_bytes(CACHE_TOKENS_PREFIX)  # not its input
    full = 2 * int(h["vocab_size"]) * corpus_positions

    def mean(key: str) -> float | None:
        vals = [r.get(key) for r in recs]
        if not positions or any(v is None for v in vals):
            return None
        return float(sum(vals)) / positions  # type: ignore[arg-type]

    sel = h.get("sample_selection")
    scores = reader.scores() if sel else None
    return CacheInfo(
        format=h["format"],
        format_version=int(h["format_version"]),
        teacher=h["teacher"],
        tokenizer_fingerprint=h["tokenizer_fingerprint"],
        vocab_size=int(h["vocab_size"]),
        num_classes=reader.num_classes,
        classes=h["classes"]["text"],
        temperature=float(h["temperature"]),
        max_seq_len=int(h["max_seq_len"]),
        sequences_total=int(h["data"]["n_sequences"]),
        sequences_stored=sum(p.n_sequences for p in reader.parts),
        sequences_train=reader.num_sequences("train"),
        sequences_eval=reader.num_sequences("eval"),
        sequences_scored=None if scores is None else len(scores[0]),
        sequences_skipped=sum(r.get("n_skipped", 0) for r in recs),
        loss_on=reader.loss_on,
        sample_selection=None if not sel else f"top {sel['ratio']:g} of training sequences by {sel['signal']}",
        positions_stored=positions,
        positions_trained=sum(r.get("n_trained", r["n_targets"]) for r in recs),
        positions_corpus=corpus_positions,
        bytes_on_disk=on_disk,
        bytes_per_stored_position=on_disk / positions if positions else None,
        bytes_per_corpus_position=on_disk / corpus_positions if corpus_positions else None,
        full_fp16_bytes=full,
        saving_vs_full_fp16=full / on_disk if on_disk else None,
        mean_teacher_entropy=mean("sum_teacher_entropy"),
        mean_unique_ids=mean("sum_unique_ids"),
        mean_kept_mass=mean("sum_kept_mass"),
        mean_padding_mass=mean("sum_padding_mass"),
        max_padding_mass=None if mean("sum_padding_mass") is None else max(r["max_padding_mass"] for r in recs),
        parts_committed=len(reader.parts),
        parts_incomplete=len(reader.missing_parts),
        finalized=reader.summary is not None,
    )


def info_dict(info: CacheInfo) -> dict[str, Any]:
    return asdict(info)

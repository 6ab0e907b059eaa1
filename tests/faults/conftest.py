"""Shared settings of the fault-injection tests: one tiny cache configuration and a reference build.

Every test here compares an interrupted-then-rerun build (or training run) with an uninterrupted one
of the same settings, so the reference is built once per session.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from selkd.cache.cli import main as cache_main

# Tiny: 3,000 tokens of 64-token sequences, 8 sequences (512 positions) per part: 6-7 parts.
BUILD_OPTIONS = [
    "--max-seq-len",
    "64",
    "--limit-tokens",
    "3000",
    "--part-tokens",
    "512",
    "--classes",
    "sample:16",
    "--eval-fraction",
    "0.1",
    "--batch-size",
    "4",
    "--device",
    "cpu",
    "--progress",
    "false",
]
# Random sample selection: the scoring pass (and its kill point) without loading a student.
SCORING_OPTIONS = ["--sample-ratio", "0.75", "--sample-signal", "random"]


@pytest.fixture(scope="session")
def build_argv(tiny_teacher_dir: Path, text_corpus_dir: Path) -> Callable[..., list[str]]:
    """``build_argv(out, *extra)``: the argv of ``selkd-cache build`` for the tiny fault-test cache."""

    def argv(out: Path | str, *extra: str) -> list[str]:
        return [
            "build",
            "--teacher",
            str(tiny_teacher_dir),
            "--data",
            str(text_corpus_dir),
            "--out",
            str(out),
            *BUILD_OPTIONS,
            *SCORING_OPTIONS,
            *extra,
        ]

    return argv


@pytest.fixture(scope="session")
def reference_cache(tmp_path_factory: pytest.TempPathFactory, build_argv: Callable[..., list[str]]) -> Path:
    """An uninterrupted build with the fault tests' settings (read-only: copy it before changing it)."""
    out = tmp_path_factory.mktemp("fault_reference") / "cache"
    assert cache_main(build_argv(out)) == 0
    return out

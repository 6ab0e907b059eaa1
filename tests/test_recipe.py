"""docs/cli.md's GPU-cluster recipe runs as written: prepare -> build -> info/verify -> train.

The commands are read from the guide itself and run on CPU with three substitutions only: the tiny
test models for the Qwen ones, a moto S3 server's bucket for ``s3://bucket`` (reached through the
standard AWS environment, as the recipe assumes), and ``torchrun --standalone --nproc-per-node 2``
for the multi-node launch options. Every other flag is the guide's.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def recipe_commands() -> list[str]:
    """The commands of the guide's GPU-cluster recipe: its code blocks and the inline `selkd-cache`
    commands, continuation lines joined, in order."""
    text = (ROOT / "docs" / "cli.md").read_text()
    recipe = text.split("## GPU-cluster recipe", 1)[1]
    commands = []
    for block, inline in re.findall(r"```\n(.*?)```|`(selkd-cache (?:info|verify) [^`]*)`", recipe, re.S):
        command = block.replace("\\\n", " ") if block else inline
        commands.append(" ".join(command.split()))
    return commands


def localize(command: str, names: dict[str, str]) -> list[str]:
    """argv for this machine: the substitutions of the module docstring, the torchrun launch options
    replaced by a 2-process standalone launch."""
    for old, new in names.items():
        command = command.replace(old, new)
    argv = shlex.split(command)
    if argv[0] == "torchrun":
        return [*TORCHRUN, *argv[argv.index("-m") :]]
    return [sys.executable, "-m", "selkd.cache", *argv[1:]]


def test_cluster_recipe_runs_as_written(
    tmp_path: Path, aws_env: Any, tiny_teacher_dir: Path, tiny_student_dir: Path, text_corpus_dir: Path
) -> None:
    import s3fs

    s3fs.S3FileSystem(endpoint_url=aws_env.endpoint_url).put(
        str(text_corpus_dir) + "/", f"{aws_env.bucket}/corpus/", recursive=True
    )
    names = {
        "verify ...": "verify s3://bucket/caches/qwen3-8b-s50",
        "Qwen/Qwen3-8B": str(tiny_teacher_dir),
        "Qwen/Qwen3-235B-A22B": str(tiny_teacher_dir),
        "Qwen/Qwen3-1.7B": str(tiny_student_dir),
        "s3://bucket/": f"s3://{aws_env.bucket}/",
        "/shared/runs/sekd": str(tmp_path / "runs" / "sekd"),
    }
    commands = recipe_commands()
    assert [c.split(" -m ")[-1].split()[:2] if c.startswith("torchrun") else c.split()[:2] for c in commands] == [
        ["selkd.cache", "prepare"],
        ["selkd-cache", "info"],
        ["selkd.cache", "build"],
        ["selkd.cache", "build"],  # the teacher larger than one GPU, with --teacher-device-map auto
        ["selkd-cache", "info"],
        ["selkd-cache", "verify"],
        ["selkd.trainer", "--cache"],
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for command in commands:
        proc = subprocess.run(localize(command, names), env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{command}\n{(proc.stdout + proc.stderr)[-4000:]}"
    final = tmp_path / "runs" / "sekd" / "final"
    assert (final / "config.json").is_file() and (tmp_path / "runs" / "sekd" / "metrics.jsonl").is_file()

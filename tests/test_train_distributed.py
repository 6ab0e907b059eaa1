"""selkd-train under ``torchrun`` on CPU (gloo): 2 ranks x batch 2 train like 1 process x batch 4.

Each test launches ``torchrun --standalone --nproc-per-node 2 -m selkd.trainer ...`` (as
``python -m torch.distributed.run``, the same program) and compares its ``metrics.jsonl`` and final
weights with a single-process run of the same global batch, which runs in this process. Runs use
``--schedule constant`` so that a run extended with a raised ``--steps`` follows the same learning
rates as one planned that long (the FSDP test resumes across two launches).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from selkd.cache.build import build_cache
from selkd.cache.config import BuildConfig
from selkd.trainer.cli import main

STEPS = 4
TOLERANCE = 1e-4  # relative, per logged value


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, text_corpus_dir: Path) -> str:
    out = tmp_path_factory.mktemp("dist_cache") / "cache"
    build_cache(
        BuildConfig(
            teacher=str(tiny_teacher_dir),
            data=[str(text_corpus_dir)],
            out=str(out),
            classes="topk:8",
            max_seq_len=64,
            part_tokens=1024,
            limit_tokens=3000,
            eval_fraction=0.1,
            progress=False,
            device="cpu",
            batch_size=8,
        )
    )
    return str(out)


def argv(cache: str, student: Path, out: Path, batch_size: int, *extra: str, steps: int = STEPS) -> list[str]:
    return [
        "--cache", cache, "--student", str(student), "--out", str(out), "--batch-size", str(batch_size),
        "--steps", str(steps), "--lr", "1e-2", "--schedule", "constant", "--save-every", "2", "--eval-every", "2",
        "--log-every", "1", "--num-workers", "0", "--progress", "false", "--device", "cpu", *extra,
    ]  # fmt: skip


def torchrun(args: list[str]) -> str:
    """Run ``torchrun --standalone --nproc-per-node 2 -m selkd.trainer ARGS``; returns its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([*cmd, "-m", "selkd.trainer", *args], env=env, capture_output=True, text=True, timeout=480)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    return output


def rows(out: Path, evaluation: bool = False) -> list[dict[str, Any]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if bool(r.get("eval")) == evaluation]


def assert_close_runs(got: Path, want: Path) -> None:
    """The same steps, the same losses and evaluations (to TOLERANCE), the same final weights."""
    a, b = rows(got), rows(want)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for key in ("loss", "kd", "selected_fraction", "grad_norm", "lr"):
        np.testing.assert_allclose([r[key] for r in a], [r[key] for r in b], rtol=TOLERANCE, err_msg=key)
    assert len({round(r["loss"], 12) for r in a}) == STEPS  # the losses move: a real comparison
    ea, eb = rows(got, True), rows(want, True)
    assert [r["step"] for r in ea] == [r["step"] for r in eb] == [2, 4]
    for key in ("eval_ce", "eval_kl_bound", "eval_top1_agree"):  # topk targets: the KL is a lower bound
        np.testing.assert_allclose([r[key] for r in ea], [r[key] for r in eb], rtol=TOLERANCE, err_msg=key)
    wa = load_file(str(got / "final" / "model.safetensors"))
    wb = load_file(str(want / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        # Adam divides by sqrt(v): where a gradient is ~0, summation-order noise can flip an update's sign, so
        # a rare entry may differ by up to ~lr; all others agree to float32 noise
        diff = (wa[k] - wb[k]).abs()
        assert float(diff.max()) < 2e-2 and float((diff > 1e-5).float().mean()) < 1e-3, (k, float(diff.max()))


RunFn = Callable[..., tuple[Path, str]]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, cache: str, tiny_student_dir: Path) -> RunFn:
    """``run(name, world, *extra) -> (out, log)``: a 4-step run, in this process (world 1, batch 4) or
    under torchrun (world 2, batch 2); made once per module and shared by the tests."""
    root = tmp_path_factory.mktemp("dist_runs")
    made: dict[str, tuple[Path, str]] = {}

    def get(name: str, world: int, *extra: str) -> tuple[Path, str]:
        if name not in made:
            out = root / name
            if world == 1:
                assert main(argv(cache, tiny_student_dir, out, 4, *extra)) == 0
                made[name] = (out, "")
            else:
                made[name] = (out, torchrun(argv(cache, tiny_student_dir, out, 2, *extra)))
        return made[name]

    return get


@pytest.mark.parametrize("select", ["none", "student-entropy:0.2"])
def test_ddp_matches_one_process(run: RunFn, select: str) -> None:
    single, _ = run(f"single-{select}", 1, "--select", select)
    ddp, log = run(f"ddp-{select}", 2, "--select", select)
    assert "2 ranks" in log
    assert log.count("selkd-train: done:") == 1  # only rank 0 logs
    assert_close_runs(ddp, single)
    if select == "none":
        assert all(r["selected_fraction"] == 1.0 for r in rows(ddp))
    # both ranks' tokens are counted: the global batch of 4 sequences of 64 tokens per step
    tokens = [r["tokens_per_s"] * r["step_time_s"] for r in rows(ddp)]
    assert tokens == pytest.approx([4 * 64] * STEPS, rel=0.05)


def test_fsdp_matches_ddp_and_resumes(run: RunFn, tmp_path: Path, cache: str, tiny_student_dir: Path) -> None:
    """FSDP2 (--fsdp) gives DDP's losses, and its sharded checkpoints (one file per rank) load in a new
    launch: 2 steps, then the same command with --steps raised to 4, equals 4 steps in one go (constant
    schedule)."""
    ddp, _ = run("ddp-student-entropy:0.2", 2, "--select", "student-entropy:0.2")
    out = tmp_path / "fsdp"
    torchrun(argv(cache, tiny_student_dir, out, 2, "--fsdp", steps=2))
    assert [r["step"] for r in rows(out)] == [1, 2]
    saved = out / "checkpoints" / "step-000002"  # sharded: each rank wrote its own part, none gathered them
    assert {"__0_0.distcp", "__1_0.distcp"} <= {p.name for p in saved.iterdir()}
    assert not (saved / "model.safetensors").exists()
    log = torchrun(argv(cache, tiny_student_dir, out, 2, "--fsdp"))
    assert "training longer: 2 -> 4 steps" in log and "resumed from" in log
    assert_close_runs(out, ddp)
    model = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    assert all(torch.isfinite(p).all() for p in model.parameters())

"""``tools/gpu_check.py --device cpu``: every check runs end to end with tiny sizes and prints one
markdown table whose numbers are real measurements (so the script cannot rot between GPU runs)."""

from __future__ import annotations

import re

import gpu_check  # tools/ is on sys.path (conftest)
import pytest


def test_gpu_check_runs_on_cpu_and_prints_one_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^machine: .*torch \d", out, re.M), out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0] == "| check | setting | measured | against | ratio |" and table[1] == "|---|---|---|---|---|"
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table[2:])}
    assert list(rows) == [
        "build vs bare teacher forward (positions/s)",
        "SE-KD 20% vs full KD: step time (s)",
        "SE-KD 20% vs full KD: peak RSS MB",
        "loader vs SE-KD consumption (tokens/s)",
        "DDP over NCCL",
    ]
    for check, (_setting, measured, against, ratio) in list(rows.items())[:4]:
        got, base = float(measured.replace(",", "")), float(against.replace(",", ""))
        assert got > 0 and base > 0, check
        assert abs(float(ratio.removesuffix("x")) - got / base) <= 0.01 + 0.02 * got / base, check  # of rounded cells
    assert "V = 2,048" in rows["SE-KD 20% vs full KD: step time (s)"][0]
    assert rows["DDP over NCCL"][:2] == ["needs 2+ GPUs", "not run"]  # one process on CPU: DDP is left out

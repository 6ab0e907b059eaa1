"""tools/bench_peers.py's process runner: the peak memory it reports is the child's own."""

from __future__ import annotations

from pathlib import Path

import bench_peers  # tools/ is on sys.path (conftest)
import numpy as np
import pytest


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM is Linux's")
def test_peak_rss_is_the_childs_own_not_the_parents(tmp_path: Path) -> None:
    # the parent holds 600 MiB; wait4's ru_maxrss would report at least that for any child it starts
    ballast = np.ones(600 * 2**20 // 8)
    script = tmp_path / "child.py"
    script.write_text("import sys\nblock = bytearray(200 * 2**20)\nprint('argv', sys.argv[1:])\n")
    small = bench_peers.run_process([str(script), "a", "b"], tmp_path / "child.log")
    assert 200 <= small < 400, small  # the child's 200 MiB and the interpreter, not the parent's 600
    assert "argv ['a', 'b']" in (tmp_path / "child.log").read_text()
    module = bench_peers.run_process(["-m", "json.tool", "--help"], tmp_path / "module.log")
    assert 0 < module < 200 and "json.tool" in (tmp_path / "module.log").read_text()
    with pytest.raises(RuntimeError, match="failed"):
        (tmp_path / "fail.py").write_text("raise SystemExit(3)\n")
        bench_peers.run_process([str(tmp_path / "fail.py")], tmp_path / "fail.log")
    assert ballast.sum() > 0


def test_tokens_per_s_skips_the_warm_up_steps() -> None:
    ends = [0.0, 10.0, 11.0, 12.0, 13.5, 14.5]  # two slow warm-up steps, then steps of 1, 1.5, 1 s
    assert bench_peers.tokens_per_s(ends, 100) == pytest.approx(100.0)

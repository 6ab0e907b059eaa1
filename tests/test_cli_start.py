"""Fast CLI start: --help, --version, usage errors, info and verify import no torch or transformers;
--help is grouped, each option in its declared group, with its default and range.

Start-up time is not asserted (a shared machine makes timings flaky); what makes a start slow is
importing torch and transformers, and that is deterministic: each check runs the CLIs' ``main`` in a
fresh interpreter and reads ``sys.modules`` afterwards. ``tools/bench_cli_start.py`` measures the time.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from selkd.cache import __version__
from selkd.cache.cli import main as cache_main
from selkd.cache.cli import make_parser
from selkd.cache.config import BuildConfig, PrepareConfig
from selkd.cache.options import GROUPS, opt, range_text
from selkd.trainer.cli import main as train_main
from selkd.trainer.config import TrainConfig, build_parser
from selkd.trainer.demo import main as demo_main

HEAVY = ("torch", "transformers")

# Runs main(argv) for each argv in one fresh interpreter, then prints one JSON line: the exit codes
# and which heavy modules were imported.
_PROBE = """
import json, sys
from {module} import main
codes = []
for argv in {argvs!r}:
    try:
        codes.append(main(argv))
    except SystemExit as exit:
        codes.append(exit.code)
print(json.dumps({{"codes": codes, "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def probe(module: str, argvs: list[list[str]]) -> dict[str, list]:
    code = _PROBE.format(module=module, argvs=argvs, heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("module", "argvs", "codes"),
    [
        (
            "selkd.cache.cli",
            [
                ["--help"],
                ["build", "--help"],
                ["prepare", "--help"],
                ["info", "--help"],
                ["--version"],
                ["build", "--version"],
                ["biuld"],  # a mistyped command
                ["build", "--clases", "topk:8"],  # a mistyped flag
                ["build", "--teacher", "t", "--data", "d", "--out", "o", "--temperature", "0"],  # out of range
                ["prepare", "--data", "d"],  # required options missing
            ],
            [0, 0, 0, 0, 0, 0, 2, 2, 2, 2],
        ),
        (
            "selkd.trainer.cli",
            [
                ["--help"],
                ["--version"],
                ["--stpes", "3"],
                ["--cache", "c", "--student", "s", "--out", "o", "--lr", "0"],
                ["--cache", "c", "--student", "s", "--out", "o", "--select", "student-entropy:2"],
            ],
            [0, 0, 2, 2, 2],
        ),
        ("selkd.trainer.demo", [["--help"], ["--version"], ["--budget-scale", "0"], ["--qiuck"]], [0, 0, 2, 2]),
    ],
    ids=["selkd-cache", "selkd-train", "selkd-demo"],
)
def test_help_version_and_usage_errors_import_no_torch(module: str, argvs: list[list[str]], codes: list[int]) -> None:
    result = probe(module, argvs)
    assert result["codes"] == codes
    assert result["heavy"] == []


def test_info_and_verify_import_no_torch(tmp_path: Path, tiny_teacher_dir: Path, text_corpus_dir: Path) -> None:
    """``info`` (of a cache and of its token store) and ``verify`` read arrays with zarr and numpy only."""
    from selkd.cache.build import build_cache

    out = tmp_path / "cache"
    cfg = BuildConfig(
        teacher=str(tiny_teacher_dir),
        data=[str(text_corpus_dir)],
        out=str(out),
        classes="topk:4",
        max_seq_len=32,
        part_tokens=256,
        limit_tokens=1500,
        progress=False,
        device="cpu",
    )
    assert build_cache(cfg) is not None
    argvs = [["info", str(out)], ["info", str(out), "--json"], ["verify", str(out)], ["info", str(out / "tokens")]]
    result = probe("selkd.cache.cli", argvs)
    assert result["codes"] == [0, 0, 0, 0]
    assert result["heavy"] == []


@pytest.mark.parametrize(
    ("main", "argv", "prog"),
    [
        (cache_main, ["--version"], "selkd-cache"),
        (cache_main, ["build", "--version"], "selkd-cache build"),
        (cache_main, ["prepare", "--version"], "selkd-cache prepare"),
        (cache_main, ["verify", "--version"], "selkd-cache verify"),
        (train_main, ["--version"], "selkd-train"),
        (demo_main, ["--version"], "selkd-demo"),
    ],
)
def test_version_on_every_command(main, argv: list[str], prog: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"{prog} {__version__}\n"
    assert __version__ == version("selkd")  # the package's own version, as pip installed it


@pytest.mark.parametrize("config_cls", [PrepareConfig, BuildConfig, TrainConfig])
def test_every_option_declares_its_group(config_cls: type) -> None:
    ungrouped = [f.name for f in dataclasses.fields(config_cls) if f.metadata and f.metadata["group"] == "other"]
    assert ungrouped == []


def test_an_unknown_group_is_refused_where_it_is_declared() -> None:
    with pytest.raises(ValueError, match="optimization"):
        opt(1, help="x", group="optimization")


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_train_help_groups_in_order_with_defaults_and_ranges() -> None:
    text = _flat(build_parser().format_help())
    titles = [f"{g} options:" for g in GROUPS if g != "other"]
    assert all(t in text for t in titles), [t for t in titles if t not in text]
    assert [text.index(t) for t in titles] == sorted(text.index(t) for t in titles)
    assert "other options:" not in text
    selection = text[text.index("selection options:") : text.index("optimisation options:")]
    assert "--select-policy" in selection and "--select SIGNAL:FRACTION" in selection and "--lr" not in selection
    assert "peak learning rate (AdamW) (default: 0.0001; range: x > 0)" in text
    assert "--eval-fraction EVAL_FRACTION online mode: fraction of sequences held out for evaluation" in text
    assert "(default: 0.01) (range: 0 <= x <= 0.5)" in text  # None default: the text says what online mode uses
    assert "(--no-fsdp: false; default: false)" in text
    assert "(default: student-entropy:0.2)" in text


def test_build_help_shows_each_declared_default_and_range() -> None:
    build = make_parser()._subparsers._group_actions[0].choices["build"]  # type: ignore[union-attr]
    text = _flat(build.format_help())
    assert "(range: 0 < x <= 1)" in text  # --sample-ratio: no default
    assert "(default: 600; range: x >= 5)" in text  # --lease-ttl
    assert "(required)" in text and "(default: sample:50)" in text
    for f in dataclasses.fields(BuildConfig):
        limits = range_text(f.metadata)
        if limits is not None:
            assert f"range: {limits})" in text, f.name

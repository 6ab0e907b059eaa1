"""selkd-demo: the README's main command keeps working end to end (on a tiny budget), and its helpers
do what the report relies on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from selkd.trainer import demo

EXPECTED_ROWS = ["teacher", "base", "ce-only", "kd-online", "kd-cache", "sekd", "sekd-3x"]
PLOTS = (
    "ce_vs_time.png",
    "ce_vs_bytes.png",
    "bars.png",
    "train_loss.png",
    "pretrain_loss.png",
    "selection_heatmap.png",
)


def _finite_numbers(row: dict) -> list[tuple[str, float]]:
    """Every number of a results.json row (None means 'not applicable', e.g. the teacher's agreement)."""
    keys = (
        "eval_ce",
        "eval_ppl",
        "top1_agree",
        "wall_s",
        "peak_mb",
        "cache_bytes",
        "bytes_per_position",
        "bytes_per_corpus_position",
    )
    return [(k, row[k]) for k in keys if row[k] is not None]


def test_quick_demo_end_to_end_and_reuse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`selkd-demo --quick` on a tiny budget: every stage runs, the table has one row per model, every
    number is finite, the report and plots exist; a second run reuses every stage."""
    out, models = tmp_path / "out", tmp_path / "models"
    argv = ["--quick", "--budget-scale", "0.03", "--out", str(out), "--models", str(models)]
    threads = torch.get_num_threads()
    assert demo.main(argv) == 0
    assert torch.get_num_threads() == threads  # the caller's process is left as it was
    printed = capsys.readouterr().out

    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [r["key"] for r in rows] == EXPECTED_ROWS
    for r in rows:
        for name, value in _finite_numbers(r):
            assert math.isfinite(value), f"{r['key']}: {name} = {value}"
        assert r["eval_ce"] > 0
        assert r["label"] in printed  # the printed table has the row
    by_key = {r["key"]: r for r in rows}
    assert by_key["teacher"]["top1_agree"] is None
    for key in EXPECTED_ROWS[1:]:
        assert 0.0 <= by_key[key]["top1_agree"] <= 1.0
    # the sample-selected cache holds about a fifth of the sequences, so it is smaller
    assert by_key["sekd-3x"]["cache_bytes"] < by_key["kd-cache"]["cache_bytes"]
    assert by_key["kd-online"]["cache_bytes"] is None and by_key["ce-only"]["cache_bytes"] is None

    report = (out / "report.md").read_text()
    assert "| method" in report and "SE-KD 3X" in report
    for png in PLOTS:  # matplotlib is a base dependency: the plots are always drawn
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / png).stat().st_size > 5000, png
        assert f"]({png})" in report
    assert "<span" in (out / "selection.html").read_text()
    _check_equal_time_and_reading(results, printed, report)
    for key in EXPECTED_ROWS[2:]:
        assert (out / "runs" / key / "metrics.jsonl").is_file()
        assert (out / "runs" / key / "final" / "config.json").is_file()
    assert len(list(models.glob("demo-*/teacher-*/model.safetensors"))) == 1

    again = demo.run_demo(quick=True, budget_scale=0.03, out=out, models=str(models))
    assert [r.key for r in again.rows] == EXPECTED_ROWS
    assert all(r.reused for r in again.rows), [r.key for r in again.rows if not r.reused]
    first = {r["key"]: r["eval_ce"] for r in rows}
    for r in again.rows:  # the same models on the same held-out sequences
        assert r.eval_ce == pytest.approx(first[r.key], abs=1e-5)


def _check_equal_time_and_reading(results: dict, printed: str, report: str) -> None:
    """The equal-time column is there and filled for every student (the fastest one's is its final CE),
    and the reading names, as the winner at equal steps and at equal time, the student with the lowest
    CE in that column."""
    for text in (printed, report):
        header = next(line for line in text.splitlines() if line.startswith("| method"))
        assert "| CE, equal time |" in header
    students = [r for r in results["rows"] if r["key"] not in ("teacher", "base")]
    fastest = results["equal_time"]["fastest"]
    for r in students:
        assert math.isfinite(r["eq_time_ce"]), r["key"]
    by_key = {r["key"]: r for r in students}
    assert by_key[fastest]["eq_time_ce"] == by_key[fastest]["eval_ce"]
    labels = {r["key"]: r["label"] for r in students}
    for column, opening in (("eval_ce", "At equal steps"), ("eq_time_ce", "At equal wall time")):
        best = min(students, key=lambda r: r[column])["key"]
        assert results["winners"]["steps" if column == "eval_ce" else "time"] == best
        paragraph = next(p for p in results["reading"] if p.startswith(opening))
        assert f"**{labels[best]}** had the lowest" in paragraph
        assert labels[best] in report.split("## Reading")[1].split("##")[0]


def test_every_option_has_help() -> None:
    parser = demo.build_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert action.help and action.help.strip(), action.dest


def test_bad_options_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--budget-scale", "0"]) == 2
    assert "--budget-scale" in capsys.readouterr().err
    assert demo.main(["--threads", "0"]) == 2


def test_split_documents_is_deterministic_and_disjoint() -> None:
    docs = [(f"mod{i}.py", f"# module {i}\n" + "x = 1\n" * (50 + i)) for i in range(40)]
    kd, extra = demo.split_documents(docs, kd_chars=2000, extra_chars=3000)
    assert (kd, extra) == demo.split_documents(list(reversed(docs)), kd_chars=2000, extra_chars=3000)
    assert kd and extra
    assert not set(kd) & set(extra) or len(set(kd)) < len(kd)  # rows may repeat text, never documents
    assert sum(map(len, kd)) >= 2000
    assert all(len(r) <= demo.CHUNK_CHARS for r in kd + extra)


def test_chunk_text_keeps_every_line() -> None:
    text = "".join(f"line {i}\n" for i in range(1000))
    pieces = demo.chunk_text(text, 100)
    assert "".join(pieces) == text
    assert all(len(p) <= 100 for p in pieces)


def test_budget_scaled_keeps_stages_meaningful() -> None:
    b = demo.BUDGETS["quick"]
    assert b.scaled(1.0) is b
    tiny = b.scaled(0.01)
    assert tiny.kd_steps >= 2 and tiny.eval_sequences >= 4 and tiny.teacher_seconds >= 1.0
    assert tiny.kd_tokens >= tiny.seq_len * tiny.kd_batch * 2  # at least one batch per epoch after the eval split
    assert tiny.evals <= tiny.kd_steps
    assert (tiny.teacher, tiny.student, tiny.vocab) == (b.teacher, b.student, b.vocab)


def test_format_table_aligns_and_marks_missing_values() -> None:
    rows = [
        demo.Row("teacher", "teacher", 3.5, math.exp(3.5), None, 300.0, 900.0, None, None, None),
        demo.Row("sekd", "SE-KD", 4.0, math.exp(4.0), 0.5, 42.0, 700.0, 2048, 47.5, 47.5, reused=True),
    ]
    table = demo.format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert "—" in lines[2] and "SE-KD *" in lines[3] and "2.0 KiB" in lines[3]


def test_plan_kd_steps_follows_machine_speed() -> None:
    """On the reference machine the budget is kept; on a 4x slower one the KD steps shrink 4x (so the
    fixed-step stages keep their share of the wall time and of the compute), the same for every method."""
    b = demo.BUDGETS["quick"]
    at = {"seconds": 15.0, "steps": round(15.0 / b.ref_step_s)}
    assert demo.plan_kd_steps(b, at) is b
    slow = {"seconds": 15.0, "steps": round(15.0 / (4 * b.ref_step_s))}
    planned = demo.plan_kd_steps(b, slow)
    assert planned.kd_steps == round(b.kd_steps / 4)
    assert 2 <= planned.evals <= planned.kd_steps and planned.warmup_steps <= planned.kd_steps // 4
    crawling = {"seconds": 15.0, "steps": 1}
    assert demo.plan_kd_steps(b, crawling).kd_steps == 8  # a floor, so the curves still mean something


def test_user_documents_reads_the_cache_formats(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first document\nwith two lines\n")
    rows = [{"text": "row one"}, {"text": "   "}, {"body": "no text field"}, {"text": "row two"}]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = demo.user_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], "text")
    assert [d for _, d in docs] == ["first document\nwith two lines\n", "row one", "row two"]
    assert len(demo.user_documents([str(tmp_path / "b.jsonl")], "text", max_chars=3)) == 1


def test_too_small_data_fails_early_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "tiny.txt").write_text("print('hello')\n" * 20)
    argv = ["--quick", "--data", str(tmp_path / "tiny.txt"), "--out", str(tmp_path / "out")]
    assert demo.main([*argv, "--models", str(tmp_path / "models")]) == 1
    err = capsys.readouterr().err
    assert "too small" in err and "--data" in err
    assert not (tmp_path / "models").exists()  # nothing was trained


def test_as_cli_commands_parse_back_to_the_same_config() -> None:
    """The commands the demo prints for its stages are real: the CLIs' own parsers give back the same
    configs (booleans switched off as --no-X)."""
    import shlex

    from selkd.cache.cli import make_parser
    from selkd.cache.config import BuildConfig
    from selkd.cache.options import from_args
    from selkd.trainer.config import TrainConfig
    from selkd.trainer.demo.util import as_cli

    build = BuildConfig(teacher="t dir", data=["a.jsonl", "b.jsonl"], out="o", classes="topk:8", progress=False,
                        temperature=2.0, storage_option={"anon": True})  # fmt: skip
    command = as_cli("selkd-cache build", build, BuildConfig(teacher="T", data=["D"], out="O"), ["classes"])
    assert "--no-progress" in command.split()
    assert from_args(BuildConfig, make_parser().parse_args(shlex.split(command)[1:])) == build
    train = TrainConfig(cache="c", student="s", out="o", progress=False, resume=True, lr=3e-4, steps=3)
    command = as_cli("selkd-train", train, TrainConfig(cache="C", student="S", out="O"))
    assert "--no-progress" in command.split() and "--resume" in command.split()
    assert TrainConfig.from_cli(shlex.split(command)[1:]) == train


def _row(key: str, ce: float, step_s: float, curve: list[list[float]]) -> demo.Row:
    """A student row that trained 4 steps of ``step_s`` seconds, evaluated along ``curve`` ([step, CE])."""
    row = demo.Row(key, key.upper(), ce, math.exp(ce), 0.5, 4 * step_s + 1, 500.0, None, None, None)
    row.clock = [[s, s * step_s] for s in range(1, 5)]
    row.eval_curve = [[0, 5.0], *curve, [4, ce]]
    return row


def _rows(sekd_ce: float) -> list[demo.Row]:
    """Teacher, base (5.0) and five students; SE-KD and SE-KD 3X take half a full-KD step's time."""
    ref = [
        demo.Row(k, k, ce, math.exp(ce), None, 10.0, 500.0, None, None, None)
        for k, ce in (("teacher", 4.0), ("base", 5.0))
    ]
    return [
        *ref,
        _row("ce-only", 4.70, 0.8, [[2, 4.85]]),
        _row("kd-online", 4.60, 2.0, [[2, 4.80]]),
        _row("kd-cache", 4.65, 1.0, [[2, 4.90]]),
        _row("sekd", sekd_ce, 0.5, [[2, 4.95]]),
        _row("sekd-3x", 4.98, 0.5, [[2, 4.99]]),
    ]


def test_reading_follows_the_numbers() -> None:
    """CE at equal wall time is read off each run's evaluations at the fastest run's training time, and
    the reading names the lowest CE in each column and says plainly when SE-KD ends worse than its base."""
    from selkd.trainer.demo import reading

    rows = _rows(sekd_ce=5.10)
    eq = reading.equal_time(rows)
    assert eq is not None and eq.seconds == 2.0 and eq.fastest == "sekd"  # first of the two fastest
    by = {r.key: r for r in rows}
    assert by["kd-cache"].eq_time_ce == pytest.approx(4.90)  # step 2 took it 2 s
    assert by["kd-online"].eq_time_ce == pytest.approx(4.90)  # step 1 of 4: between 5.0 (0 s) and 4.80 (4 s)
    assert by["ce-only"].eq_time_ce == pytest.approx(4.85 + (4.70 - 4.85) * (2.0 - 1.6) / 1.6)
    assert by["sekd"].eq_time_ce == 5.10
    text = reading.reading(rows, eq)
    assert text[0].startswith("At equal steps (4 each), **KD-ONLINE** had the lowest held-out CE (4.600), 0.050")
    assert "**CE-ONLY** had the lowest" in text[1]  # 4.81 at 2 s, ahead of the slower KD runs
    assert reading.winners(rows) == {"steps": "kd-online", "time": "ce-only"}
    assert "0.100 nats *worse* than the base student" in text[2]
    assert "fifth of full KD's teacher signal" in text[3] and "0.50x the time" in text[3]

    better = _rows(sekd_ce=4.50)
    text = reading.reading(better, reading.equal_time(better))
    assert text[0].startswith("At equal steps (4 each), **SEKD** had the lowest")
    assert "worse" not in text[2] and "gave at least as much as distilling all of them" in text[3]

    better[0].eval_ce = 4.95  # a teacher no better than the base: said first
    assert reading.reading(better, None)[0].startswith("Caution: the teacher (4.950) is not clearly better")


def test_passage_marks_the_positions_se_kd_selects(tiny_student_dir: Path, tiny_tokenizer: object) -> None:
    """The heat map's data come from the trainer's selection: ceil(20% of L-1) positions, the ones with the
    highest student entropy; the HTML marks exactly those tokens."""
    from selkd.cache.teacher import load_causal_lm
    from selkd.trainer.demo.passage import passage_html, select_passage

    model = load_causal_lm(str(tiny_student_dir), "cpu", torch.float32)
    seq = torch.randint(0, len(tiny_tokenizer), (41,), generator=torch.Generator().manual_seed(0)).numpy()
    p = select_passage(model, tiny_tokenizer, seq, "student-entropy:0.2", "sequence", shown=41)
    assert len(p.tokens) == len(p.entropy) == len(p.selected) == 41 and not p.selected[0]
    assert sum(p.selected) == math.ceil(0.2 * 40)
    chosen = [e for e, s in zip(p.entropy[1:], p.selected[1:]) if s]
    others = [e for e, s in zip(p.entropy[1:], p.selected[1:]) if not s]
    assert min(chosen) >= max(others)
    assert passage_html(p).count("text-decoration: underline") == sum(p.selected)

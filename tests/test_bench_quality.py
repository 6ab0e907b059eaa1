"""``tools/bench_quality.py``'s regime map: the arithmetic and rules its tables rest on (the equal-time
steps, the base student's plateau, the step time read from a run's metrics, the map's verdicts) and the
shape of the regimes' method list. The runs themselves are the benchmark's, not the tests'."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import bench_quality as bq  # tools/ is on sys.path (conftest)
import pytest

from selkd.trainer.spec import DEFAULT_CURRICULUM_STEPS


def test_equal_time_steps_are_the_steps_full_kds_time_buys() -> None:
    assert bq.equal_time_steps(120, 0.5, 0.3) == 200  # a 0.6x step: 120 / 0.6
    assert bq.equal_time_steps(82, 0.44, 0.26) == 139  # 82 * 0.44 / 0.26 = 138.8
    assert bq.equal_time_steps(120, 0.5, 0.9) == 67  # a step dearer than full KD's buys fewer
    assert bq.equal_time_steps(120, 0.5, 0.5) == 120
    assert bq.equal_time_steps(1, 0.1, 100.0) == 1  # never zero
    with pytest.raises(ValueError, match="positive"):
        bq.equal_time_steps(120, 0.5, 0.0)


def test_plateau_is_the_last_interval_gaining_under_delta() -> None:
    assert not bq.plateaued([(0, 5.0)], 0.01)  # one score: nothing to compare
    assert not bq.plateaued([(0, 5.0), (100, 4.8)], 0.01)
    assert bq.plateaued([(0, 5.0), (100, 4.8), (200, 4.795)], 0.01)
    assert bq.plateaued([(0, 5.0), (100, 5.02)], 0.01)  # getting worse is a plateau too


def test_median_step_time_ignores_a_paused_window_and_the_first_steps(tmp_path: Path) -> None:
    rows = [{"step": 1, "step_time_s": 9.0}, {"step": 2, "step_time_s": 3.0}]  # start-up: skipped
    rows += [{"step": s, "step_time_s": t} for s, t in ((3, 0.30), (4, 0.31), (5, 40.0), (6, 0.29), (7, 0.30))]
    rows.insert(4, {"step": 4, "eval_ce": 4.2})  # an evaluation row has no step time
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert bq.median_step_s(path) == pytest.approx(0.30)  # the SIGSTOPped window (40 s) does not move it
    path.write_text(json.dumps(rows[0]) + "\n")
    assert bq.median_step_s(path) is None


def _summary(ces: dict[str, float]) -> dict[str, dict[str, float]]:
    return {f"rg-bBtB-{k}": {"ce": v} for k, v in ces.items()}


def test_verdicts_answer_within_002_at_06x_and_against_random_per_budget() -> None:
    summary = _summary(
        {
            "kd-full": 4.000,
            "random": 4.050,
            "random-eqt": 3.990,
            "se": 4.015,  # within 0.02 of full KD, but its step costs 0.7x: not the "yes"
            "se-eqt": 4.000,
            "se-hybrid": 4.019,  # within, at 0.55x
            "se-hybrid-eqt": 3.995,
            "se-ce": 3.900,  # better than full KD, at 1.8x
        }
    )
    ratio = {"kd-full": 1.0, "se": 0.7, "random": 0.5, "se-stoch": 0.7, "se-hybrid": 0.55, "se-ce": 1.8}
    v = bq.verdicts(summary, ratio, "B", "B")
    assert set(v) == {
        ("se", "steps"),
        ("se", "time"),
        ("se-hybrid", "steps"),
        ("se-hybrid", "time"),
        ("se-ce", "steps"),
    }
    assert v["se", "steps"]["vs_full"] == pytest.approx(0.015) and not v["se", "steps"]["within"]
    assert v["se", "steps"]["beats_random"] and v["se", "steps"]["vs_random"] == pytest.approx(-0.035)
    assert not v["se", "time"]["beats_random"] and v["se", "time"]["vs_random"] == pytest.approx(0.010)
    assert v["se-hybrid", "steps"]["within"] and v["se-hybrid", "time"]["within"]
    assert v["se-ce", "steps"]["vs_full"] == pytest.approx(-0.1) and not v["se-ce", "steps"]["within"]


def test_regime_methods_cover_four_regimes_with_equal_time_twins() -> None:
    ms = [m for m in bq.methods() if "regimes" in m.groups]
    keys = [m.key for m in ms]
    assert len(keys) == len(set(keys)) == 2 + 4 * (8 + 5)  # CE only per base; 8 methods, 5 with an equal-time twin
    assert all(set(m.groups) == {"regimes"} for m in ms)
    assert not any("regimes" in m.groups for m in bq.methods() if not m.key.startswith("rg-"))
    by_key = {m.key: m for m in ms}
    for m in ms:
        if m.equal_time:
            twin = by_key[m.key.removesuffix("-eqt")]
            assert dataclasses.replace(m, key=twin.key, equal_time=False) == twin  # only the steps differ
            assert twin.select != "none" and m.cost_of in {r[0] for r in bq.REGIME_METHODS}
    # the training order: every regime method in exactly one tier, full KD, SE-KD, random and CE only first
    tiers = {m.key: bq.run_tier(m) for m in ms}
    assert sum(len(t) for t in bq.RUN_TIERS) == 14 and set(tiers.values()) == set(range(len(bq.RUN_TIERS)))
    assert {k for k, t in tiers.items() if t == 0} == {
        *(f"rg-b{b}t{t}-{n}" for b, t in bq.REGIMES for n in ("kd-full", "se", "random")),
        "rg-bA-ce-only",
        "rg-bB-ce-only",
    }
    assert {bq.run_tier(m) for m in bq.methods() if not m.key.startswith("rg-")} == {0}
    assert {by_key[f"rg-b{b}t{t}-se"].source for b, t in bq.REGIMES} == {"full-tA", "full-tB"}
    assert by_key["rg-bBtB-se"].base == "B" and by_key["rg-bBtB-se"].teacher == "B"


def test_teacher_b_continues_teacher_a_and_its_identity_follows() -> None:
    extra = bq.EXTRA_MODELS
    assert bq._start("teacher-B", extra) == "teacher-A" in extra  # trained first, in teacher B's process
    assert bq._start("base-B", extra) == "base-A" not in extra  # the demo's: nothing to train first
    ids = bq.model_ids(extra, "root")
    changed = bq.model_ids({**extra, "teacher-A": {**extra["teacher-A"], "steps": 1}}, "root")
    assert ids["base-A"] == ids["teacher-demo"] == "root" and len(set(ids.values())) == 4
    assert changed["teacher-A"] != ids["teacher-A"] and changed["teacher-B"] != ids["teacher-B"]  # B retrains
    assert changed["base-B"] == ids["base-B"] and bq.model_ids(extra, "other")["base-B"] != ids["base-B"]


def test_curriculum_reaches_top_k_half_way_through_its_own_run(tmp_path: Path) -> None:
    ctx = {"caches": {"full-tA": "c"}, "bases": {"A": "b"}, "steps": 40, "run_steps": {}, "batch": 2, "lr": 1e-3}
    ctx["warmup_steps"] = 2
    by_key = {m.key: m for m in bq.methods()}
    cfg = bq.train_config(by_key["rg-bAtA-se-curr"], 0, tmp_path, ctx)
    assert cfg.select_policy == "curriculum" and cfg.curriculum_steps == 20 and cfg.steps == 40
    plain = bq.train_config(by_key["rg-bAtA-se"], 0, tmp_path, ctx)
    assert plain.curriculum_steps == DEFAULT_CURRICULUM_STEPS  # other runs keep the default (and identity)
    assert bq.train_config(by_key["rg-bAtA-se-global"], 0, tmp_path, ctx).select_policy == "global"

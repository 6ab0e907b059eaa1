"""What the demo's table says, in words generated from its numbers: CE at equal wall time, and the plain
reading printed under the table (which method won, by how much, why at this scale, what the paper found).

Equal wall time, defined once here: every student trains the same number of steps, and the one whose
steps took the least time sets the budget ``T`` (its training time: the optimizer steps alone, without
start-up, evaluations and saving). Each student's *CE at equal wall time* is its held-out CE after ``T``
seconds of its own steps, read off the held-out evaluations along its run (linear in time between two
evaluations; the base student's CE at time 0). The fastest student's value is its final CE; a slower one
is read before its learning rate has decayed, which costs it a little (said in the table's note).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from selkd.trainer.demo.report import Row

REFERENCE_ROWS = ("teacher", "base")  # rows that are not compared students
TEACHER_MARGIN = 0.1  # nats: a teacher less than this much better than a student is not clearly better


@dataclass(frozen=True)
class EqualTime:
    """The equal-wall-time budget: ``seconds`` of training, what the ``fastest`` student needed."""

    seconds: float
    fastest: str  # its key


def students(rows: Sequence[Row]) -> list[Row]:
    return [r for r in rows if r.key not in REFERENCE_ROWS]


def train_seconds(row: Row) -> float:
    """The student's training time (its optimizer steps): the end of its clock."""
    return row.clock[-1][1] if row.clock else float("nan")


def ce_at_seconds(row: Row, seconds: float) -> float:
    """Held-out CE of ``row`` after ``seconds`` of its training: its evaluations ([step, CE], step 0 the
    base) placed on its clock ([step, cumulative seconds]) and interpolated linearly in time."""
    if not row.clock or not row.eval_curve:
        return float("nan")
    clock = np.array([[0.0, 0.0], *row.clock])
    steps, ces = np.array(row.eval_curve, dtype=float).T
    at = np.interp(steps, clock[:, 0], clock[:, 1])  # seconds at each evaluation
    return float(np.interp(min(seconds, at[-1]), at, ces))


def equal_time(rows: Sequence[Row]) -> EqualTime | None:
    """The budget, and each student's ``eq_time_ce`` filled in; None when no student has a clock."""
    timed = [r for r in students(rows) if r.clock]
    if not timed:
        return None
    fastest = min(timed, key=train_seconds)
    budget = EqualTime(train_seconds(fastest), fastest.key)
    for r in timed:
        r.eq_time_ce = r.eval_ce if r is fastest else ce_at_seconds(r, budget.seconds)
    return budget


def table_note(eq: EqualTime | None, rows: Sequence[Row]) -> str:
    """The header note of the table's equal-time column."""
    if eq is None:
        return "CE, equal time: not measured (no training clock)."
    label = {r.key: r.label for r in rows}[eq.fastest]
    return (
        f"CE, equal time: each student's held-out CE after {eq.seconds:.1f} s of its own training steps, the time "
        f"the fastest, {label}, needed for all its steps (read off the held-out evaluations along each run, linear "
        "in time between them; training time counts the optimizer steps only, not start-up, evaluation or "
        "saving). A slower method is read before its learning rate has decayed, which costs it a little."
    )


def _nats(d: float) -> str:
    return f"{abs(d):.3f} nats {'lower' if d < 0 else 'higher'}"


def _ranking(rows: Sequence[Row], ce_of: str) -> list[Row]:
    return sorted((r for r in students(rows) if getattr(r, ce_of) is not None), key=lambda r: getattr(r, ce_of))


def _winner_sentence(rows: Sequence[Row], ce_of: str, how: str) -> str:
    ranked = _ranking(rows, ce_of)
    win, second = ranked[0], ranked[1]
    ce = {r.key: getattr(r, ce_of) for r in ranked}
    base = {r.key: r for r in rows}["base"].eval_ce
    return (
        f"{how}, **{win.label}** had the lowest held-out CE ({ce[win.key]:.3f}), {_nats(ce[win.key] - ce[second.key])}"
        f" than the next, {second.label} ({ce[second.key]:.3f}), and {_nats(ce[win.key] - base)} than the base "
        f"student ({base:.3f}). Order: " + " < ".join(f"{r.label} {ce[r.key]:.3f}" for r in ranked) + "."
    )


def _sekd_sentence(by: dict[str, Row]) -> str:
    sekd, full, base = by["sekd"], by["kd-cache"], by["base"]
    s = (
        f"SE-KD ended {_nats(sekd.eval_ce - full.eval_ce)} than full KD from the same cache at equal steps"
        + (
            f" and {_nats(sekd.eq_time_ce - full.eq_time_ce)} at equal wall time"
            if sekd.eq_time_ce is not None and full.eq_time_ce is not None
            else ""
        )
        + "."
    )
    if sekd.eval_ce > base.eval_ce:
        s += (
            f" It left the student {sekd.eval_ce - base.eval_ce:.3f} nats *worse* than the base student it started "
            "from: in this run, distilling only the most uncertain fifth of positions cost more than it taught."
        )
    return s


def _why(by: dict[str, Row], n_steps: int) -> str:
    """Why at this scale: the facts that set the demo apart from the paper's run, in the measured order."""
    sekd, full = by["sekd"], by["kd-cache"]
    ratio = train_seconds(sekd) / train_seconds(full)
    speed = f"an SE-KD step took {ratio:.2f}x the time of a full-KD step here (the paper: 0.74-0.80x)"
    if sekd.eval_ce > full.eval_ce:
        return (
            f"Why at this scale: {speed}, but the student is tiny and trains {n_steps} steps. Distilling a fifth of "
            "the positions, SE-KD gets a fifth of full KD's teacher signal per step, and over so few steps the "
            "amount of signal shows more than the choice of positions."
        )
    return (
        f"Why at this scale: {speed}, and even over {n_steps} steps of a tiny student, distilling only the most "
        "uncertain fifth of the positions gave at least as much as distilling all of them."
    )


PAPER = (
    "What the paper found at 1.7B (Qwen3-8B teacher, 80M tokens): SE-KD at 20% of positions beat full KD "
    "(perplexity 6.9 against 7.3, accuracy 64.8 against 64.4), with SE-KD steps 1.25-1.36x faster; SE-KD 3X "
    "matched full KD (7.3) in 3h58m with its cache reused, against 22h52m. The gains need a student that learns "
    "from the teacher for many steps; the demo shows the pipeline and the costs, not that result."
)


def _teacher_caution(by: dict[str, Row]) -> list[str]:
    """A first paragraph when the teacher is not clearly (TEACHER_MARGIN) better than the base student:
    then KD can only pull the students towards a weaker model, and the comparison says little."""
    teacher, base = by["teacher"].eval_ce, by["base"].eval_ce
    if teacher <= base - TEACHER_MARGIN:
        return []
    return [
        f"Caution: the teacher ({teacher:.3f}) is not clearly better than the base student ({base:.3f}), so "
        "distilling from it can only pull the students towards a model no better than where they started; "
        "read the rest with that in mind (the teacher trains for a number of seconds: a slow or busy machine "
        "or a smaller --budget-scale leaves it weak)."
    ]


def reading(rows: Sequence[Row], eq: EqualTime | None) -> list[str]:
    """The plain reading under the table, one paragraph per item, every claim from ``rows``."""
    by = {r.key: r for r in rows}
    n = max((int(r.clock[-1][0]) for r in students(rows) if r.clock), default=0)
    out = _teacher_caution(by)
    out.append(_winner_sentence(rows, "eval_ce", f"At equal steps ({n} each)" if n else "At equal steps"))
    if eq is not None:
        label = by[eq.fastest].label
        how = f"At equal wall time ({eq.seconds:.1f} s of training, what {label} needed for its steps)"
        out.append(_winner_sentence(rows, "eq_time_ce", how))
    out += [_sekd_sentence(by), _why(by, n), PAPER]
    return out


def winners(rows: Sequence[Row]) -> dict[str, str]:
    """{"steps": key, "time": key} of the lowest held-out CE at equal steps and at equal wall time."""
    out = {"steps": _ranking(rows, "eval_ce")[0].key}
    timed = _ranking(rows, "eq_time_ce")
    if timed:
        out["time"] = timed[0].key
    return out


def base_sentence(record: dict) -> str:
    """How far the base student trained: its training CE over the last quarter of its pretraining (a
    curve still falling fast means KD from it measures a student that had more to learn from plain CE)."""
    curve = record.get("curve") or []
    if len(curve) < 4:
        return f"The base student pretrained {record['seconds']:.0f} s ({record['steps']:,} steps) with plain CE."
    seconds = curve[-1][1]
    before = min(curve, key=lambda c: abs(c[1] - 0.75 * seconds))
    return (
        f"The base student pretrained {record['seconds']:.0f} s ({record['steps']:,} steps) with plain CE; its "
        f"training CE was {before[2]:.3f} three quarters of the way through and {curve[-1][2]:.3f} at the end "
        "(a curve still falling fast means the students' first gains are partly further pretraining)."
    )

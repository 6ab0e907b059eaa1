"""The demo's pictures (PNG, matplotlib's Agg backend): held-out CE against training time and against
cache bytes, the training losses by kind (CE and divergences never share an axis), bar charts from zero,
the pretraining curves and the text heat map of what SE-KD selects."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selkd.trainer.demo.passage import Passage
from selkd.trainer.demo.reading import EqualTime, students, train_seconds
from selkd.trainer.demo.report import Row


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _references(ax: Any, rows: Sequence[Row]) -> None:
    """The teacher's and the base student's held-out CE as horizontal lines."""
    for r, style in zip(rows[:2], (":", "--")):
        ax.axhline(r.eval_ce, color="grey", ls=style, lw=1, label=f"{r.key} ({r.eval_ce:.3f})")


def ce_curves(rows: Sequence[Row], eq: EqualTime | None, out: Path) -> Path:
    """Held-out CE of every student against its steps and against its training seconds."""
    plt = _pyplot()
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for r in students(rows):
        if not r.eval_curve:
            continue
        steps, ces = zip(*r.eval_curve)
        line = by_step.plot(steps, ces, marker="o", ms=3, label=r.label)[0]
        seconds = [_seconds_at(r, s) for s in steps]
        by_time.plot(seconds, ces, marker="o", ms=3, color=line.get_color())
    for ax in (by_step, by_time):
        _references(ax, rows)
        ax.grid(alpha=0.3)
    if eq is not None:
        by_time.axvline(eq.seconds, color="black", lw=0.8, label=f"equal wall time ({eq.seconds:.1f} s)")
    by_step.set(xlabel="step", ylabel="held-out CE (nats)", title="Held-out CE by step")
    by_time.set(xlabel="training seconds (optimizer steps)", title="Held-out CE by training time")
    by_step.legend(fontsize=7)
    by_time.legend(fontsize=7)
    return _save(fig, out / "ce_vs_time.png")


def _seconds_at(row: Row, step: float) -> float:
    """Seconds of training at ``step`` on the row's clock (0 at step 0)."""
    import numpy as np

    clock = np.array([[0.0, 0.0], *row.clock]) if row.clock else np.zeros((1, 2))
    return float(np.interp(step, clock[:, 0], clock[:, 1]))


def ce_vs_bytes(rows: Sequence[Row], out: Path) -> Path:
    """Final held-out CE against the bytes of teacher targets each method reads (CE only: none; the online
    teacher stores none either, but computes every target: it is left out)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in students(rows):
        if r.cache_bytes is None and r.key != "ce-only":
            continue
        mib = (r.cache_bytes or 0) / 2**20
        ax.scatter([mib], [r.eval_ce], s=40, zorder=3)
        ax.annotate(r.label, (mib, r.eval_ce), fontsize=7, xytext=(4, 4), textcoords="offset points")
    _references(ax, rows)
    ax.set_xlim(left=0)
    ax.set(xlabel="teacher targets read (cache MiB; CE only reads none)", ylabel="held-out CE (nats)")
    ax.set_title("Held-out CE against cache bytes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out / "ce_vs_bytes.png")


def train_losses(rows: Sequence[Row], out: Path) -> Path:
    """Training losses split by kind: the CE term in one panel, the KD terms in the other (they are different
    quantities). Within the KD panel the online run's term is the exact KL, the cached runs' the KL to the
    sampled targets (sparse, lower in entropy than the teacher's distribution, so it sits higher), and
    SE-KD's the mean over its selected, most uncertain positions."""
    plt = _pyplot()
    fig, (ce_ax, kd_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in students(rows):
        for ax, curve in ((ce_ax, r.ce_curve), (kd_ax, r.kd_curve)):
            if curve and any(v for _, v in curve):
                xs, ys = zip(*curve)
                ax.plot(xs, ys, label=r.label)
    ce_ax.set(xlabel="step", ylabel="training CE (nats)", title="Cross-entropy term")
    kd_ax.set(xlabel="step", ylabel="KD term (nats)", title="KD term (online: exact KL; cache: KL to sampled targets)")
    for ax in (ce_ax, kd_ax):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    return _save(fig, out / "train_loss.png")


def bars(rows: Sequence[Row], out: Path) -> Path:
    """Bar charts with axes from zero: final held-out CE (equal steps and equal time), training seconds
    and cache MiB per student; each bar is labelled with its value, since CE differences are small next to
    CE itself."""
    plt = _pyplot()
    studs = students(rows)
    labels = [r.key for r in studs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    x = range(len(studs))
    width = 0.4
    ce_steps = [r.eval_ce for r in studs]
    ce_time = [r.eq_time_ce if r.eq_time_ce is not None else 0.0 for r in studs]
    for ax, values, title, fmt in (
        (axes[1], [train_seconds(r) for r in studs], "training seconds (optimizer steps)", "{:.1f}"),
        (
            axes[2],
            [(r.cache_bytes or 0) / 2**20 for r in studs],
            "cache MiB read (online: none, teacher runs)",
            "{:.2f}",
        ),
    ):
        ax.bar(x, values, color="tab:blue")
        ax.bar_label(ax.containers[0], [fmt.format(v) for v in values], fontsize=7)
        ax.set_title(title)
    bar_steps = axes[0].bar([i - width / 2 for i in x], ce_steps, width, label="equal steps")
    bar_time = axes[0].bar([i + width / 2 for i in x], ce_time, width, label="equal wall time")
    for container in (bar_steps, bar_time):
        axes[0].bar_label(container, fmt="%.2f", fontsize=6)
    axes[0].set_title("held-out CE (nats)")
    axes[0].legend(fontsize=7, loc="lower right")
    for ax in axes:
        ax.set_ylim(bottom=0)
        ax.set_xticks(list(x), labels, rotation=30, ha="right", fontsize=8)
    return _save(fig, out / "bars.png")


def pretraining(pretrain: dict[str, dict[str, Any]], out: Path) -> Path:
    """The teacher's and the base student's pretraining CE against seconds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, info in pretrain.items():
        curve = info.get("curve") or []
        if curve:
            ax.plot([c[1] for c in curve], [c[2] for c in curve], label=f"{key} ({info['params'] / 1e6:.2f}M params)")
    ax.set(xlabel="seconds", ylabel="training CE (nats)", title="Pretraining (time-budgeted, plain CE)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "pretrain_loss.png")


def heat_map(p: Passage, out: Path, cols: int = 100, max_lines: int = 24) -> Path:
    """The passage as text on a grid of ``cols`` monospace cells: each token's cells shaded by the
    student's entropy when predicting it (white: the passage's lowest, dark red: its highest), SE-KD's
    selected tokens boxed in black. The axes are placed by hand so that one cell is one character."""
    plt = _pyplot()
    cells = _layout(p, cols, max_lines)
    lines = max((row for row, *_ in cells), default=0) + 1
    width, text_frac = 12.0, 0.9
    fig = plt.figure(figsize=(width, 0.27 * lines + 0.8))
    ax = fig.add_axes((0.01, 0.02, text_frac, 1 - 0.6 / fig.get_figheight()))
    seen = [e for e in p.entropy[1:] if e == e] or [0.0, 1.0]
    norm = plt.Normalize(min(seen), max(seen))
    cmap = plt.get_cmap("Reds")
    font = width * text_frac * 72 / cols / 0.602 * 0.97  # points: a monospace character is 0.602 em wide
    for row, col, text, ent, sel in cells:
        shade = cmap(0.0 if ent != ent else 0.85 * norm(ent))
        edge = "black" if sel else "none"
        ax.add_patch(plt.Rectangle((col, -row - 1), len(text), 1, facecolor=shade, edgecolor=edge, lw=1.0))
        ax.text(col, -row - 0.5, text, family="monospace", fontsize=font, va="center", ha="left")
    ax.set_xlim(0, cols)
    ax.set_ylim(-lines, 0)
    ax.axis("off")
    bar = fig.add_axes((0.925, 0.1, 0.012, 0.75))
    fig.colorbar(plt.cm.ScalarMappable(cmap=cmap, norm=norm), cax=bar, label="entropy (nats)")
    fig.suptitle(
        f"A held-out passage: shade = the base student's entropy when predicting the token; boxed = the "
        f"positions --select {p.select} distils",
        fontsize=9,
    )
    path = out / "selection_heatmap.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _layout(p: Passage, cols: int, max_lines: int) -> list[tuple[int, int, str, float, bool]]:
    """(line, column, text, entropy, selected) of each visible piece of each token: newlines start a new
    line, long lines wrap at ``cols``, tabs are 4 spaces; at most ``max_lines`` lines."""
    cells: list[tuple[int, int, str, float, bool]] = []
    row = col = 0
    for tok, ent, sel in zip(p.tokens, p.entropy, p.selected):
        for i, piece in enumerate(tok.replace("\t", "    ").split("\n")):
            if i:
                row, col = row + 1, 0
            while piece:
                if col >= cols:
                    row, col = row + 1, 0
                take = piece[: cols - col]
                if row >= max_lines:
                    return cells
                cells.append((row, col, take, ent, sel))
                col, piece = col + len(take), piece[len(take) :]
    return cells


def make_plots(
    rows: Sequence[Row], pretrain: dict[str, dict[str, Any]], eq: EqualTime | None, passage: Passage, out: Path
) -> list[Path]:
    """Every picture of the report, written into ``out``; also ``selection.html`` (the passage as text)."""
    from selkd.trainer.demo.passage import passage_html

    (out / "selection.html").write_text(passage_html(passage))
    return [
        ce_curves(rows, eq, out),
        ce_vs_bytes(rows, out),
        bars(rows, out),
        train_losses(rows, out),
        pretraining(pretrain, out),
        heat_map(passage, out),
    ]

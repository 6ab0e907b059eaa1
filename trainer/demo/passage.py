"""Which tokens SE-KD distils in a held-out passage: the base student's entropy at every position and the
positions SE-KD's selection keeps, through the trainer's own selection functions (so a change of signal
or policy shows here too). Drawn by :func:`selkd.trainer.demo.plots.heat_map`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class Passage:
    """``tokens[t]``: the text of token t; ``entropy[t]`` / ``selected[t]``: the student's entropy when
    predicting token t (nats) and whether SE-KD distils that prediction (``tokens[0]`` has neither)."""

    tokens: list[str]
    entropy: list[float]  # [n]; entropy[0] = nan
    selected: list[bool]  # [n]; selected[0] = False
    select: str  # the --select it shows
    policy: str  # the --select-policy


@torch.no_grad()
def select_passage(
    model: torch.nn.Module, tokenizer: Any, seq: np.ndarray, select: str, policy: str, shown: int = 160
) -> Passage:
    """Score the whole held-out sequence ``seq`` ([L] token ids) as SE-KD's first step would (the base
    student's entropy, the selection per ``select`` and ``policy`` over all L - 1 positions) and keep the
    first ``shown`` tokens for the picture."""
    from selkd.trainer.selection import SignalInputs, compute_scores, select_positions
    from selkd.trainer.spec import parse_select

    spec = parse_select(select)
    x = torch.from_numpy(np.asarray(seq, dtype=np.int64))[None]  # [1, L]
    logp = torch.log_softmax(model(input_ids=x, use_cache=False).logits[:, :-1].float(), -1)  # [1, L-1, V]
    entropy = -(logp.exp() * logp).sum(-1)  # [1, L-1]: predicting token t+1
    valid = torch.ones_like(entropy, dtype=torch.bool)
    scores = compute_scores(spec.signal, SignalInputs(valid, student_entropy=entropy))
    mask = select_positions(scores, valid, spec.fraction, policy, generator=torch.Generator().manual_seed(0))
    n = min(shown, x.shape[1])
    tokens = [tokenizer.decode([int(t)]) for t in x[0, :n]]
    return Passage(
        tokens,
        [float("nan"), *entropy[0, : n - 1].tolist()],
        [False, *mask[0, : n - 1].tolist()],
        select,
        policy,
    )


def passage_html(p: Passage) -> str:
    """The passage as HTML: each token's background by entropy (white to red), SE-KD's tokens underlined
    and bold; hovering a token shows its entropy."""
    import html

    top = max((e for e in p.entropy[1:] if e == e), default=1.0) or 1.0
    spans = []
    for tok, ent, sel in zip(p.tokens, p.entropy, p.selected):
        shade = 0.0 if ent != ent else ent / top
        style = f"background: rgba(220, 40, 30, {0.75 * shade:.2f})"
        if sel:
            style += "; font-weight: bold; text-decoration: underline"
        title = "" if ent != ent else f' title="entropy {ent:.2f} nats{", selected" if sel else ""}"'
        spans.append(f'<span style="{style}"{title}>{html.escape(tok)}</span>')
    return (
        "<!doctype html><meta charset='utf-8'><title>SE-KD selection</title>"
        f"<p>Background: the base student's entropy when predicting the token (white 0, red {top:.1f} nats). "
        f"<b><u>Bold underlined</u></b>: the positions <code>--select {html.escape(p.select)}</code> "
        f"(policy {html.escape(p.policy)}) distils.</p><pre style='font-size: 14px'>" + "".join(spans) + "</pre>"
    )

"""Teacher logits -> SparseTargets (class selection) and the per-position teacher scalars.

Everything here is vectorised torch over positions (no per-row Python loops) and processed in
chunks of positions so that ``[chunk, V]`` fp32 temporaries stay small at V = 151,936. Which classes
a mode keeps is its codec's ``select`` (:mod:`selkd.cache.codecs`); ``sample:N`` draws with
:func:`sample_counts`.

Padded heads: the classes are the tokenizer's C tokens (:func:`selkd.cache.teacher.num_classes`); a
teacher head with V > C rows has padding at ids >= C. Its mass there (at temperature 1) is measured per
position, then those columns are dropped before anything else: targets, entropy and next-token log-prob
are all of the teacher's distribution renormalised over the C real classes, and full targets are C wide.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from selkd.cache.logits import TeacherHead, softmax_entropy
from selkd.cache.modes import ClassSpec
from selkd.cache.targets import SparseTargets


@dataclass(frozen=True)
class TeacherOutputs:
    """What the cache stores for T positions (the sparse targets and two exact scalars), and what it records."""

    targets: SparseTargets  # leading shape [T], ids < C
    entropy: torch.Tensor  # [T] float32, teacher entropy at temperature 1 (nats) over the C real classes
    next_logprob: torch.Tensor  # [T] float32, teacher log-prob (temperature 1, over C) of the actual next token
    padding_mass: torch.Tensor  # [T] float32, teacher mass (temperature 1) on padded head rows (ids >= C)


BLOCK = 128  # two-level inverse-CDF sampling: pick a block of BLOCK classes, then a class inside it


def sample_counts(
    probs: torch.Tensor, num_draws: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``num_draws`` classes with replacement from each row of ``probs`` [T, V]; return unique
    ids [T, U] (ascending, padding 0) and their counts [T, U] (padding 0), U = the largest number of
    unique ids in any row.

    Exact inverse-CDF sampling in two levels, so no [T, V] cumulative sum is built: a cumulative
    sum over block masses picks a block of BLOCK classes, then a cumulative sum inside the chosen
    blocks ([T, N, BLOCK]) picks the class."""
    t, v = probs.shape
    nb = -(-v // BLOCK)
    p = probs.float()
    if nb * BLOCK != v:
        p = torch.nn.functional.pad(p, (0, nb * BLOCK - v))
    blocks = p.view(t, nb, BLOCK)
    cdf_b = blocks.sum(-1).cumsum_(-1)  # [T, nb]
    u = torch.rand((t, num_draws), generator=generator, device=probs.device, dtype=torch.float32)
    u = u * cdf_b[:, -1:]
    b = torch.searchsorted(cdf_b, u, right=True).clamp_(max=nb - 1)  # [T, N]
    before = torch.where(b > 0, cdf_b.gather(1, (b - 1).clamp_(min=0)), torch.zeros_like(u))
    inner = blocks.gather(1, b.unsqueeze(-1).expand(t, num_draws, BLOCK)).cumsum_(-1)  # [T, N, BLOCK]
    r = (u - before).clamp_(min=0).unsqueeze(-1)
    j = torch.searchsorted(inner, r, right=True).squeeze(-1).clamp_(max=BLOCK - 1)
    draws = (b * BLOCK + j).clamp_(max=v - 1)
    draws, _ = torch.sort(draws, dim=-1)
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    group = torch.cumsum(first.long(), dim=-1) - 1  # [T, N]: index of each draw's unique id
    u_max = int(group[:, -1].max().item()) + 1 if t else 0
    counts = torch.zeros((t, num_draws), dtype=torch.long, device=probs.device)
    counts.scatter_add_(1, group, torch.ones_like(group))
    ids = torch.zeros((t, num_draws), dtype=torch.long, device=probs.device)
    ids.scatter_(1, group, draws)
    return ids[:, :u_max], counts[:, :u_max]


CHUNK = 256  # positions per class-selection chunk, also within a head chunk ([CHUNK, C] fp32 scratch)


class _Scratch:
    """Two float32 buffers of ``rows`` x ``width`` reused by every chunk of one call: the selection's
    [chunk, C] temporaries (shifted logits, probabilities) and the padding mass's [chunk, V - C] one are
    carved from them instead of being allocated per chunk (on a CPU every fresh allocation of that size
    is new pages: about 600 page faults per position at V = 151,936)."""

    def __init__(self, rows: int, width: int, device: torch.device) -> None:
        self.rows, self.width = rows, width
        self._flat = torch.empty(2 * rows * width, dtype=torch.float32, device=device)

    def pair(self, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two contiguous [rows, cols] views (rows <= self.rows, cols <= self.width), disjoint."""
        n = rows * cols
        return self._flat[:n].view(rows, cols), self._flat[self.rows * self.width :][:n].view(rows, cols)


def padding_mass(
    logits: torch.Tensor, real_lse: torch.Tensor, classes: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax mass (temperature 1) of the padded columns ``classes ..`` of ``logits`` [T, V], given the
    log-normaliser ``real_lse`` [T] of the real ones: ``sigmoid(lse_pad - lse_real)`` (exact, and 0
    when the padded logits are ``-inf`` or there are none). [T] float32. ``out``: a float32 [T, V - C]
    scratch buffer (none allocated then)."""
    pad = logits[:, classes:]
    if pad.shape[1] == 0:
        return torch.zeros_like(real_lse)
    m = pad.amax(-1, keepdim=True).float()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf: exp gives 0, lse -inf
    e = torch.sub(pad, m, out=out) if out is not None else pad.float() - m
    lse_pad = e.exp_().sum(-1).log_() + m.squeeze(-1)
    return torch.sigmoid(lse_pad - real_lse)


def _chunk_outputs(
    logits: torch.Tensor,
    next_ids: torch.Tensor,
    spec: ClassSpec,
    temperature: float,
    generator: torch.Generator | None,
    classes: int,
    scratch: _Scratch | None = None,
) -> TeacherOutputs:
    """One chunk's outputs from its teacher logits [c, V] (``classes`` <= V real ones) and next_ids [c]:
    one fused softmax pass gives the entropy and the normaliser, which the codec and the padding mass
    reuse; with ``scratch`` (rows >= c, width >= max(C, V - C)) no [c, V]-sized temporary is allocated
    beyond what the codec returns."""
    x = logits[:, :classes].float()  # [chunk, C]: the padded columns never reach the codec
    c = x.shape[0]
    p1, lse, entropy = softmax_entropy(x, scratch.pair(c, classes) if scratch is not None else None)
    next_lp = x.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1) - lse
    codec = spec.codec
    probs = p1 if codec.uses_probs and temperature == 1.0 else None
    del p1  # [chunk, C]: freed before the codec makes its own, unless it takes it
    reuse = {"lse": lse} if codec.uses_lse else {}
    targets = codec.select(x, temperature, spec.k, generator, probs, **reuse)
    pad_out = scratch.pair(c, logits.shape[1] - classes)[0] if scratch is not None else None  # the shifted logits' room
    return TeacherOutputs(targets, entropy, next_lp, padding_mass(logits, lse, classes, pad_out))


def teacher_outputs(
    logits: torch.Tensor,
    next_ids: torch.Tensor,
    spec: ClassSpec,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    chunk: int = CHUNK,
    classes: int | None = None,
) -> TeacherOutputs:
    """Class selection for T positions.

    logits:   [T, V] teacher logits (any float dtype; math in fp32).
    next_ids: [T] int64 actual next tokens (< ``classes``).
    classes:  C, the number of real classes (``num_classes(tokenizer)``, <= V); None: every column.
    Returns targets with leading shape [T] on the logits' device, over the C real classes; sample-mode
    rows are padded to the largest number of unique ids in the whole call.
    """
    if logits.dim() != 2 or next_ids.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits [T, V] and next_ids [T], got {tuple(logits.shape)} and {tuple(next_ids.shape)}"
        )
    c = logits.shape[1] if classes is None else classes
    if not 0 < c <= logits.shape[1]:
        raise ValueError(f"classes must be in [1, {logits.shape[1]}] (the logits' width), got {c}")
    parts = _selected([(0, logits)], next_ids, spec, temperature, generator, c, chunk)
    if not parts:
        parts = [_chunk_outputs(logits[:0], next_ids[:0], spec, temperature, generator, c)]
    return _joined(parts)


def head_outputs(
    head: TeacherHead,
    hidden: torch.Tensor,
    next_ids: torch.Tensor,
    spec: ClassSpec,
    temperature: float,
    generator: torch.Generator | None,
    classes: int,
) -> TeacherOutputs:
    """:func:`teacher_outputs` of T positions from their final hidden states, ``head.chunk`` positions
    per head matmul into its reused [chunk, V] buffer (selection ``CHUNK`` positions at a time within
    it), so their [T, V] logits never exist at once.

    hidden: [T, H] or [B, T, H] from ``head.decode`` (the predicting positions of one sequence or of
    a batch); next_ids: [T] or [B * T] int64, positions numbered one sequence after another. Returns
    targets with leading shape [T] (or [B * T]) on ``head.device``; the same as :func:`teacher_outputs`
    of the model's logits (to float32 rounding of the head's matmul; on a CPU sample:N draws do not
    depend on the chunking)."""
    next_ids = next_ids.to(head.device)
    parts = _selected(head.chunks(hidden), next_ids, spec, temperature, generator, classes, CHUNK)
    if not parts:  # no positions: empty targets of the right width
        return teacher_outputs(hidden.new_empty((0, classes)), next_ids, spec, temperature, generator)
    return _joined(parts)


def _selected(
    pieces: Iterable[tuple[int, torch.Tensor]],
    next_ids: torch.Tensor,
    spec: ClassSpec,
    temperature: float,
    generator: torch.Generator | None,
    classes: int,
    chunk: int,
) -> list[TeacherOutputs]:
    """Outputs of ``chunk`` positions at a time of each (start, logits [n, V]) piece, in order, all
    through one :class:`_Scratch` (sized by the first, and so largest, chunk)."""
    parts: list[TeacherOutputs] = []
    scratch: _Scratch | None = None
    for start, logits in pieces:
        for s in range(0, logits.shape[0], chunk):
            part = logits[s : s + chunk]
            if scratch is None:
                width = max(classes, logits.shape[1] - classes)
                scratch = _Scratch(part.shape[0], width, part.device)
            ids = next_ids[start + s : start + s + part.shape[0]]
            parts.append(_chunk_outputs(part, ids, spec, temperature, generator, classes, scratch))
    return parts


def _joined(parts: list[TeacherOutputs]) -> TeacherOutputs:
    """Outputs of consecutive position ranges as one (a single range as it is: no concatenation copy)."""
    if len(parts) == 1:
        return parts[0]
    return TeacherOutputs(
        SparseTargets.concat([p.targets for p in parts]),
        torch.cat([p.entropy for p in parts]),
        torch.cat([p.next_logprob for p in parts]),
        torch.cat([p.padding_mass for p in parts]),
    )

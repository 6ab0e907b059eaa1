"""Do the teacher's targets serve the objective's options? One check for online and cache mode.

Online mode knows its targets from ``--classes`` when the options are parsed (``trainer/config.py``
raises a ConfigError, exit 2); cache mode learns them from the cache's header when it opens the cache
(the training loop raises a TrainError, exit 1). What each target mode allows is its
:class:`~selkd.cache.modes.TargetMode`; only the wording here says where the targets came from. Pure
Python (option parsing runs it).
"""

from __future__ import annotations

from typing import Protocol

from selkd.cache.modes import MODES, list_modes


class TargetOptions(Protocol):
    """The options that depend on the targets (a TrainConfig has them)."""

    loss: str
    select_signal: str
    topk_renormalize: bool


def check_targets(mode: str, options: TargetOptions, classes: str | None = None) -> str | None:
    """The first option that targets of ``mode`` cannot serve, as a one-line message; None if all fit.

    ``classes``: the ``--classes`` text in online mode; None when the targets come from a cache."""
    m, loss, online = MODES[mode], options.loss, classes is not None
    if m.losses is not None and loss not in m.losses:
        undefined = f"--loss {loss} is not defined on {m.targets_noun}"
        if online:
            use = list_modes(lambda t: t.losses is None or loss in t.losses, syntax=True)
            return f"{undefined} (--classes {classes}): {m.loss_reason}; use --classes {use}"
        return f"{undefined} (the cache holds {m.syntax}); use {' or '.join(m.losses)}"
    if options.select_signal == "reverse-kl" and not m.reverse_kl:
        got = f", got --classes {classes}" if online else f"; the cache holds {m.syntax}"
        return f"--select reverse-kl needs {list_modes(lambda t: t.reverse_kl)} targets{got}"
    if options.topk_renormalize and not m.renormalize:
        if online:
            needs = list_modes(lambda t: t.renormalize, syntax=True)
            return f"--topk-renormalize needs --classes {needs}, got --classes {classes}"
        return f"--topk-renormalize needs {list_modes(lambda t: t.renormalize)} targets; the cache holds {mode} targets"
    return None

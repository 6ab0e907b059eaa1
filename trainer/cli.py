"""`selkd-train`: parse the config, run the loop, map errors to messages and exit codes.

Exit codes: 0 success; 1 a run-time failure the user can act on; 2 bad usage or configuration. A full
disk (ENOSPC, or EDQUOT: over quota) is one line naming ``--out``, not a traceback; a checkpoint being
written then is removed, and rerunning the same command resumes from the last complete one.

Start-up: the training loop (torch, transformers) is imported once the options are parsed and checked,
so ``--help``, ``--version`` and a usage error answer at once.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from selkd.cache.errors import Command, run_cli
from selkd.trainer.config import TrainConfig

# What rerunning the command does after the disk filled up outside a checkpoint write (metrics, logs).
DISK_FULL_RERUN = "it resumes from the last complete checkpoint in --out (with none, it starts over)"
INTERRUPTED = "interrupted; rerun the same command to resume from the last checkpoint"


def main(argv: Sequence[str] | None = None) -> int:
    cmd = Command("selkd-train", interrupted=INTERRUPTED, disk_full_rerun=DISK_FULL_RERUN)

    def run() -> int:
        cfg = TrainConfig.from_cli(list(sys.argv[1:] if argv is None else argv))
        cmd.out = str(cfg.out)
        from selkd.trainer.loop import train

        train(cfg)
        return 0

    return run_cli(cmd, run)


if __name__ == "__main__":
    sys.exit(main())

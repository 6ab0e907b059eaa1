"""`selkd-train`: parse the config, run the loop, map errors to messages and exit codes.

Exit codes: 0 success; 1 a run-time failure the user can act on; 2 bad usage or configuration. A full
disk (ENOSPC, or EDQUOT: over quota) is one line naming ``--out``, not a traceback; a checkpoint being
written then is removed, and rerunning the same command resumes from the last complete one.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from selkd.cache.build import BuildError
from selkd.cache.documents import DataError
from selkd.cache.errors import disk_full_error, disk_full_message
from selkd.cache.options import ConfigError
from selkd.cache.reader import CacheError
from selkd.cache.store import StoreError
from selkd.cache.teacher import ModelError
from selkd.cache.tokens import TokenStoreError
from selkd.trainer.checkpoint import CheckpointError
from selkd.trainer.config import TrainConfig
from selkd.trainer.loop import TrainError, train
from selkd.trainer.run_dir import OutError

USER_ERRORS = (
    TrainError,
    OutError,
    CacheError,
    DataError,
    ModelError,
    StoreError,
    CheckpointError,
    BuildError,
    TokenStoreError,
)
# What rerunning the command does after the disk filled up outside a checkpoint write (metrics, logs).
DISK_FULL_RERUN = "it resumes from the last complete checkpoint in --out (with none, it starts over)"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = TrainConfig.from_cli(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as err:
        print(f"selkd-train: error: {err}", file=sys.stderr)
        return 2
    try:
        train(cfg)
        return 0
    except ConfigError as err:
        print(f"selkd-train: error: {err}", file=sys.stderr)
        return 2
    except USER_ERRORS as err:
        print(f"selkd-train: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        full = disk_full_error(err)
        if full is None:
            raise
        print(f"selkd-train: error: {disk_full_message(str(cfg.out), full, DISK_FULL_RERUN)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("selkd-train: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

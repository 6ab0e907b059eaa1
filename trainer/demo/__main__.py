"""``python -m selkd.trainer.demo``: the same as ``selkd-demo``."""

import sys

from selkd.trainer.demo.cli import main

sys.exit(main())

"""`python -m selkd.trainer` (and `torchrun ... -m selkd.trainer ...`) works like `selkd-train`."""

import sys

from selkd.trainer.cli import main

sys.exit(main())

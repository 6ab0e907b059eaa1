"""`python -m selkd.cache` (and `torchrun -m selkd.cache build ...`) works like `selkd-cache`."""

import sys

from selkd.cache.cli import main

sys.exit(main())

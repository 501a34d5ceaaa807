"""``python -m fastres.bench``."""

import sys

from fastres.bench.cli import main

sys.exit(main())

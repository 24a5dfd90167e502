"""``python -m benchmarks``: the main benchmark (see ``benchmarks.main``)."""

import sys

from benchmarks.main import main

sys.exit(main())

#!/usr/bin/env python
"""Run the main benchmark: ``python -m benchmarks``.

A thin entry into the ``benchmarks`` package at the repository root: it only puts the
repository on the import path first.

    python scripts/bench.py                                   # everything, 20000 tasks
    python scripts/bench.py --only ceiling,drain --tasks 50000
    python scripts/bench.py --quick --skip-peers --json /tmp/bench.json   # the smoke run
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.main import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Run the dashboard's reads: ``python -m benchmarks.dashboard``.

A thin entry into the ``benchmarks`` package at the repository root: it only puts the
repository on the import path first.

    python scripts/bench_dashboard.py --streams 1000
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.dashboard import main

if __name__ == "__main__":
    main()

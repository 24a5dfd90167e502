#!/usr/bin/env python
"""Run durable mode: ``python -m benchmarks.durable``.

A thin entry into the ``benchmarks`` package at the repository root: it only puts the
repository on the import path first.

    python scripts/bench_durable.py --quick
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.durable import main

if __name__ == "__main__":
    sys.exit(main())

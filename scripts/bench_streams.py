#!/usr/bin/env python
"""Run many streams: ``python -m benchmarks.streams``.

A thin entry into the ``benchmarks`` package at the repository root: it only puts the
repository on the import path first.

    python scripts/bench_streams.py --quick
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.streams import main

if __name__ == "__main__":
    main()

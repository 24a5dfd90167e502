#!/usr/bin/env python3
"""Run a pyfiq fault-injection scenario and check it (a thin wrapper of ``python -m pyfiq_harness run``;
the harness installs with ``pip install -e harness``).

    python scripts/scenario.py --profile short           # well under 2 minutes
    python scripts/scenario.py --profile soak            # 30 minutes, thousands of faults
    python scripts/scenario.py --faults kill,stop --redis redis://127.0.0.1:6390/0
    python scripts/scenario.py --profile vandal          # one fault kind, a few times, 10-30 s:
                                                         # also slow-reply, async-stop, gil, clock, operator

Exit status 0 means the checker found no breach; the journals, logs and verdict.json stay
in the run directory it prints.
"""

from __future__ import annotations

from pyfiq_harness.cli import run_command

if __name__ == "__main__":
    run_command()

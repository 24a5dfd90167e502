"""The time drill's replica module: ``python -m pyfiq worker pyfiq_harness.time_replica``.

It registers a periodic schedule and a plain task, both of which append one JSON line per run
to the journal the drill names (``$PYFIQ_TIME_JOURNAL``): what ran, which task id, in which
process, with which version of the schedule, and when by this process's wall clock.
"""

from __future__ import annotations

import json
import os
import time

import pyfiq

from .clock import CLOCK_SHIFT_ENV
from .time_drill import DELAYED_QUEUE, EVERY_ENV, JOURNAL_ENV, SCHEDULE, TICK_QUEUE, VERSION_ENV

_fd = os.open(os.environ[JOURNAL_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
_version = int(os.environ.get(VERSION_ENV, "0"))


def _journal(**fields: object) -> None:
    # One write per line: O_APPEND keeps lines of every process whole and apart.
    os.write(_fd, (json.dumps(fields) + "\n").encode())


@pyfiq.fifo.periodic(
    TICK_QUEUE,
    every=float(os.environ.get(EVERY_ENV, "1")),
    name="time.tick",
    schedule=SCHEDULE,
    version=_version,
    args=(_version, int(os.environ.get(CLOCK_SHIFT_ENV, "0"))),
)
def tick(fired_by_version: int, fired_by_shift: int) -> None:
    """The version and wall-clock shift of the replica whose tick call enqueued this task (any
    replica runs it: the task is the same in every version)."""
    ctx = pyfiq.current_task()
    _journal(
        kind="tick",
        tick=int(ctx.headers["pyfiq-tick"]),
        task=ctx.id,
        enqueued_ms=ctx.enqueued_ms,
        version=fired_by_version,
        shift=fired_by_shift,
        pid=os.getpid(),
    )


@pyfiq.fifo(DELAYED_QUEUE, name="time.delayed")
def delayed(seq: int) -> None:
    ctx = pyfiq.current_task()
    _journal(kind="delayed", seq=seq, task=ctx.id, started_ms=int(time.time() * 1000), pid=os.getpid())

"""A keyed queue for multi-process stream tests (imported by replicas with ``--import``; its
registered name keeps the module path they used before it moved here)."""

from __future__ import annotations

from pyfiq import fifo
from pyfiq.ops.scenario_tasks import step

KEYED_QUEUE = "keyed-scenario"


@fifo(queue=KEYED_QUEUE, name="tests.keyed_app.keyed_step", key=lambda seq, key, hold=0.0: key)
def keyed_step(seq: int, key: str, hold: float = 0.0) -> int:
    return step(seq, hold=hold)

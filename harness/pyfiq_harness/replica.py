"""The scenario runner's replica module: ``python -m pyfiq worker pyfiq_harness.replica``.

It registers the journaled scenario tasks (``pyfiq.ops.scenario_tasks``) and, when the runner
asks for it (``$PYFIQ_SCENARIO_DRILLS``), answers SIGUSR1 with the stop drill: the replica's
worker is stopped with a timeout shorter than the task it runs, while the process lives on.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import threading
import time

from pyfiq.ops import scenario_tasks  # noqa: F401  (registers the scenario steps in this process)

#: Set by the scenario runner: a replica process then answers SIGUSR1 with the stop drill.
DRILL_ENV = "PYFIQ_SCENARIO_DRILLS"
#: The drill's ``stop()`` timeout: shorter than any task it is meant to interrupt.
STOP_DRILL_TIMEOUT = 0.3
_drills: set[asyncio.Task[None]] = set()


def _on_stop_drill(signum: int, frame: object) -> None:
    # Python runs signal handlers in the main thread, where ``pyfiq worker --driver asyncio``
    # runs its loop; a threaded replica's main thread only waits, and must not block in a stop.
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        threading.Thread(target=_threaded_stop_drill, name="pyfiq-stop-drill", daemon=True).start()
        return
    loop.call_soon_threadsafe(_start_stop_drill, loop)


def _start_stop_drill(loop: asyncio.AbstractEventLoop) -> None:
    task = loop.create_task(_stop_drill())
    _drills.add(task)  # the loop keeps only a weak reference to a task
    task.add_done_callback(_drills.discard)


async def _stop_drill() -> None:
    """``await worker.stop(timeout=STOP_DRILL_TIMEOUT)`` on the replica's AsyncWorker while the
    process lives on: what an application does when it stops consuming but keeps serving.

    The replica command owns its worker and offers no handle to it, so the drill finds it
    among the live objects; the process then stays up until the runner ends it.
    """
    from pyfiq.workers.aio import AsyncWorker

    for worker in [o for o in gc.get_objects() if isinstance(o, AsyncWorker)]:
        started = time.monotonic()
        clean = await worker.stop(timeout=STOP_DRILL_TIMEOUT)
        _report_stop_drill(worker.replica, clean, time.monotonic() - started)


def _threaded_stop_drill() -> None:
    """``worker.stop(timeout=STOP_DRILL_TIMEOUT)`` on the replica's ThreadedWorker, the process
    living on (the replica command exits only once its own stop has returned)."""
    from pyfiq.workers.threaded import ThreadedWorker

    for worker in [o for o in gc.get_objects() if isinstance(o, ThreadedWorker)]:
        started = time.monotonic()
        clean = worker.stop(timeout=STOP_DRILL_TIMEOUT)
        _report_stop_drill(worker.replica, clean, time.monotonic() - started)


def _report_stop_drill(replica: str, clean: bool, took: float) -> None:
    print(
        f"pyfiq_harness.replica.stop_drill replica={replica} clean={clean} took={took:.3f}s",
        file=sys.stderr,
        flush=True,
    )


if os.environ.get(DRILL_ENV) and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGUSR1, _on_stop_drill)

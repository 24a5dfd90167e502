"""What the two worker twins share before they differ in how they wait: the backend, settings,
the registry whose tasks they run, replica identity, the clock they give the engine and the
``Scheduler`` they drive."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable

from ..backend.backend import RedisQueueBackend
from ..engine.keys import consumed_queues, queue_of
from ..engine.lease import Lease, replica_id
from ..engine.scheduler import LockFactory, Scheduler
from ..engine.stream import StreamRun
from ..engine.ticks import TickLoop
from ..errors import ConfigurationError
from ..functions import Registry, default_registry
from ..logs import log
from ..task import TaskRecord, check_payload
from .reports import SYSTEM_CLOCK


class WorkerBase:
    """The common state of ``ThreadedWorker`` and ``AsyncWorker``."""

    #: The longest wait between two attempts of a task, whatever its retry policy asks (None:
    #: the policy's own). Set before ``start()``; ``pyfiq.testing.drain`` sets 0, so a test
    #: does not wait out production back-offs.
    max_retry_wait: float | None = None

    def _setup(
        self,
        backend: RedisQueueBackend | None,
        registry: Registry | None,
        queues: Iterable[str] | None,
        concurrency: int,
        replica: str | None,
        driver: str,
        lock: LockFactory,
    ) -> None:
        if concurrency < 1:
            raise ConfigurationError(f"concurrency must be at least 1, got {concurrency}")
        #: Whose tasks this worker runs, and whose queues it consumes unless given ``queues``.
        self.registry = default_registry if registry is None else registry
        self.backend = backend or self.registry.get_backend()
        self.settings = self.backend.settings
        self.ops = self.backend.ops
        self.concurrency = concurrency
        self.replica = replica or replica_id()
        # A pre-fork server may build the worker in its parent and start it in each child: see
        # adopt_process.
        self._pid = os.getpid()
        self._replica_given = replica is not None
        self._driver = driver
        self.clock = SYSTEM_CLOCK
        self.scheduler = Scheduler(
            self.ops, concurrency, consumed_queues(queues), self.registry, clock=self.clock, lock=lock
        )
        self.scheduler.identify(
            self.replica, host=socket.gethostname(), pid=os.getpid(), driver=driver, concurrency=concurrency
        )
        serializer = self.settings.serializer
        #: The periodic schedules of the consumed queues, which this worker fires (with every
        #: other replica that runs them: each tick still enqueues one task).
        limit = self.settings.max_payload_bytes

        def encode(record: TaskRecord) -> bytes:
            payload = record.encode(serializer)
            check_payload(record.name, payload, limit)  # a tick is refused as a call would be
            return payload

        self.ticks = TickLoop(self.registry, consumed_queues(queues), encode, self._tick_log)

    def _adopt_process(self, started: bool) -> bool:
        """Make a worker built before a fork this process's own; False if it was already
        started before the fork: its threads, loop and leases stayed with the parent, and
        anything done with them here (a release with the parent's fencing token) would act
        for a worker that still runs there."""
        pid = os.getpid()
        if pid == self._pid:
            return True
        if started:
            return False
        self._pid = pid
        if not self._replica_given:
            # Two children under one replica id would look like one replica to the fleet.
            self.replica = replica_id()
            self.log = log.bind(replica=self.replica)
        self.scheduler.identify(
            self.replica, host=socket.gethostname(), pid=pid, driver=self._driver, concurrency=self.concurrency
        )
        return True

    def _tick_log(self, level: str, event: str, **fields: object) -> None:
        getattr(log, level)(event, replica=self.replica, **fields)

    @property
    def held_streams(self) -> list[str]:
        """The streams this worker holds a lease on now."""
        return sorted(lease.stream for lease in self.scheduler.held_leases())

    def started_fields(self, driver: str) -> dict[str, object]:
        """What the start's log line says: who runs what, against which Redis (no password)."""
        from .. import __version__

        return {
            "version": __version__,
            "redis": self.backend.address,
            "prefix": self.settings.prefix,
            "queues": ",".join(self.scheduler.consumed_queues()) or "(none registered yet)",
            "concurrency": self.concurrency,
            "ack_mode": self.settings.ack_mode,
            "driver": driver,
        }

    def running_tasks(self) -> list[dict[str, object]]:
        """The tasks this worker runs now: stream, task id and seconds since it started (by
        Redis's clock, estimated), longest-running first: what a stop waits for."""
        out: list[dict[str, object]] = []
        for lease in self.scheduler.held_leases():
            if lease.running is not None:
                task_id, since_ms = lease.running
                now_ms = lease.redis_now_ms(self.clock.monotonic())
                out.append(
                    {"stream": lease.stream, "task_id": task_id, "running_s": round((now_ms - since_ms) / 1000, 1)}
                )
        return sorted(out, key=lambda row: -float(str(row["running_s"])))

    def _stream_run(self, lease: Lease, stopping: Callable[[], bool], abandoned: Callable[[], bool]) -> StreamRun:
        """The engine's run of one lease, with this worker's clock and the queue's rate limit."""
        return StreamRun(
            self.ops,
            lease,
            stopping=stopping,
            abandoned=abandoned,
            clock=self.clock,
            rate_limit=self.scheduler.tasks.rate_limit_of(queue_of(lease.stream)),
        )

"""What the two worker twins share before they differ in how they wait: the backend, settings,
replica identity and the engine's ``Scheduler`` they drive."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable

from .. import functions
from ..backend.backend import RedisQueueBackend
from ..engine.keys import consumed_queues
from ..engine.lease import replica_id
from ..engine.scheduler import Scheduler
from ..errors import ConfigurationError


class WorkerBase:
    """The common state of ``ThreadedWorker`` and ``AsyncWorker``."""

    def _setup(
        self,
        backend: RedisQueueBackend | None,
        queues: Iterable[str] | None,
        concurrency: int,
        replica: str | None,
        driver: str,
    ) -> None:
        if concurrency < 1:
            raise ConfigurationError(f"concurrency must be at least 1, got {concurrency}")
        self.backend = backend or functions.get_backend()
        self.settings = self.backend.settings
        self.ops = self.backend.ops
        self.concurrency = concurrency
        self.replica = replica or replica_id()
        self.scheduler = Scheduler(self.ops, concurrency, consumed_queues(queues), functions)
        self.scheduler.identify(
            self.replica, host=socket.gethostname(), pid=os.getpid(), driver=driver, concurrency=concurrency
        )

    @property
    def held_streams(self) -> list[str]:
        """The streams this worker holds a lease on now."""
        return sorted(lease.stream for lease in self.scheduler.held_leases())

"""A worker that lives in the processes serving an application.

Web servers run an application in several processes, and pre-fork servers (gunicorn with
``--preload``, uWSGI without ``lazy-apps``) import it once and fork the serving processes from
that one. Threads do not cross a fork, so a worker must be started in each serving process,
after the fork, and never handed down from the parent: an ``EmbeddedWorker`` keeps one
``ThreadedWorker`` per process, starts it on the first ``start()`` of that process (again in
each forked child) and stops it gracefully at interpreter exit, handing its leases over.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Iterable

from ..backend.backend import RedisQueueBackend
from ..errors import ConfigurationError
from ..functions import Registry
from ..workers.threaded import ThreadedWorker

__all__ = ["EmbeddedWorker"]


class EmbeddedWorker:
    """One [`ThreadedWorker`][pyfiq.ThreadedWorker] per process, made and started by ``start()``.

    ``start()`` is cheap once the worker runs and safe from any thread, so a framework can call
    it from a post-fork hook, an app factory or every request alike. A worker started before a
    fork stays the parent's: the child's first ``start()`` starts a worker of its own (with its
    own replica id and connections), and ``stop()`` in the child never touches the parent's.
    At interpreter exit the process's worker is stopped within ``stop_timeout`` seconds (running
    tasks finish, leases are handed over), so a rolling restart of the web tier hands streams
    over in milliseconds instead of a lease TTL.
    """

    def __init__(
        self,
        backend: RedisQueueBackend | None = None,
        *,
        queues: Iterable[str] | None = None,
        concurrency: int = 4,
        registry: Registry | None = None,
        stop_timeout: float = 30.0,
    ) -> None:
        if concurrency < 1:
            raise ConfigurationError(f"concurrency must be at least 1, got {concurrency}")
        if stop_timeout < 0:
            raise ConfigurationError(f"stop_timeout must be at least 0, got {stop_timeout}")
        self.backend = backend
        self.queues = None if queues is None else list(queues)
        self.concurrency = concurrency
        self.registry = registry
        self.stop_timeout = stop_timeout
        self._worker: ThreadedWorker | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._at_exit = False

    def _here(self) -> threading.Lock:
        """This process's lock, with what a parent process started forgotten: a lock copied by
        a fork may be held by a thread that does not exist in the child."""
        pid = os.getpid()
        if pid != self._pid:
            self._pid, self._worker, self._lock = pid, None, threading.Lock()
        return self._lock

    @property
    def worker(self) -> ThreadedWorker | None:
        """The worker this process started, if any."""
        with self._here():
            return self._worker

    def start(self) -> ThreadedWorker:
        """This process's worker, started now if it is not running yet."""
        with self._here():
            if self._worker is None:
                self._worker = ThreadedWorker(
                    self.backend, registry=self.registry, queues=self.queues, concurrency=self.concurrency
                ).start()
                if not self._at_exit:
                    atexit.register(self._stop_at_exit)
                    self._at_exit = True
            return self._worker

    def stop(self, timeout: float | None = None) -> bool:
        """Stop this process's worker (``stop_timeout`` unless ``timeout``); False if a task was
        still running then. A later ``start()`` starts a new worker."""
        with self._here():
            worker, self._worker = self._worker, None
        if worker is None:
            return True
        return worker.stop(self.stop_timeout if timeout is None else timeout)

    def _stop_at_exit(self) -> None:
        # Inherited by forked children with the rest of the interpreter: _here() keeps a child
        # from stopping what its parent started.
        self.stop()

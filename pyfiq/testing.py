"""What an application's own test suite needs to test code that uses pyfiq.

- ``memory_backend()``: a fresh embedded in-process Redis (fakeredis with Lua, the
  ``pyfiq[memory]`` extra), isolated from every other test, made the backend of the default
  registry (or of the ``registry`` given) so ``@fifo`` functions enqueue to it.
- ``drain(backend, queues)``: run a real worker until the given queues hold no task, so a test
  can call ``charge(...)`` and then assert on what the task did.

Never imported by pyfiq itself.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

from .backend.backend import RedisQueueBackend
from .functions import Registry, default_registry
from .workers.threaded import ThreadedWorker

__all__ = ["drain", "memory_backend"]

#: Settings that make tests fast: short leases and polls, few shards.
FAST: dict[str, Any] = {"lease_ttl": 1.0, "poll_interval": 0.05, "shards": 2}


def memory_backend(*, registry: Registry | None = None, **settings: Any) -> RedisQueueBackend:
    """A new, empty embedded backend (``memory://<unique name>``), configured as the backend of
    ``registry`` (default: the registry of ``@pyfiq.fifo``).

    Other keyword arguments are ``Settings`` overrides on top of ``FAST``."""
    backend = RedisQueueBackend(f"memory://{uuid.uuid4().hex}", **{**FAST, **settings})
    (default_registry if registry is None else registry).configure(backend)
    return backend


def _idle(backend: RedisQueueBackend, queues: list[str]) -> bool:
    for stream in backend.active_streams():
        if stream.split("#", 1)[0] in queues:
            info = backend.queue_info(stream)
            if info["pending"] or info["inflight"] or info["scheduled"]:
                return False
    return True


def drain(
    backend: RedisQueueBackend,
    queues: Iterable[str],
    *,
    timeout: float = 10.0,
    concurrency: int = 4,
    registry: Registry | None = None,
) -> None:
    """Run a worker of ``registry`` (default: the registry of ``@pyfiq.fifo``) on ``queues``
    until none of their streams holds a task (done or dead-lettered), delayed ones included,
    then stop it. Raises ``TimeoutError`` if that takes longer than ``timeout`` seconds (a task
    that blocks its queue, or one delayed beyond it)."""
    names = list(queues)
    deadline = time.monotonic() + timeout
    with ThreadedWorker(backend, registry=registry, queues=names, concurrency=concurrency):
        while not _idle(backend, names):
            if time.monotonic() > deadline:
                raise TimeoutError(f"queues {names} still hold tasks after {timeout}s")
            time.sleep(0.01)

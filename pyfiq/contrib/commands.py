"""What the frameworks' worker commands (``flask pyfiq worker``, ``manage.py pyfiq_worker``)
share: the app's configuration as the defaults of ``pyfiq worker``'s options."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..config import Settings


def worker_defaults(
    url: str, settings: Settings, queues: Sequence[str] | None, concurrency: int, stop_timeout: float
) -> dict[str, Any]:
    """A framework's configuration as the defaults of ``worker``'s options (its ``default_map``),
    so ``flask pyfiq worker`` and ``manage.py pyfiq_worker`` run what the app configured."""
    return {
        "url": url,
        "prefix": settings.prefix,
        "shards": settings.shards,
        "lease_ttl": settings.lease_ttl,
        "poll_interval": settings.poll_interval,
        "max_deliveries": settings.max_deliveries,
        "ack_mode": settings.ack_mode,
        "prefetch": settings.prefetch,
        "min_replicas": settings.min_replicas,
        "replica_timeout": settings.replica_timeout,
        "queues": ",".join(queues) if queues else None,
        "concurrency": concurrency,
        "stop_timeout": stop_timeout,
    }

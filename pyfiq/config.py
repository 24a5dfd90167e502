"""One frozen, validated settings object shared by the backend, the workers and the scripts."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .errors import ConfigurationError
from .serializers import JSONSerializer, Serializer

#: Lua's unpack() and one script's run time bound how many tasks one call may carry.
MAX_PREFETCH = 1000


@dataclass(frozen=True)
class Settings:
    """pyfiq's configuration. Times are in seconds.

    Every replica that shares queues must agree on ``prefix``, ``shards`` and ``serializer``.
    """

    prefix: str = "pyfiq"
    #: Streams are spread over this many shards (hash tags); fixed for the life of the data.
    shards: int = 16
    #: A lease lapses this long after its last renewal.
    lease_ttl: float = 10.0
    #: How often held leases are renewed; default ``lease_ttl / 5``.
    heartbeat_interval: float | None = None
    #: Safety poll of idle workers (Pub/Sub wake-ups are the fast path).
    poll_interval: float = 1.0
    #: A task handed out more than this many times (its consumer died each time) is poison.
    max_deliveries: int = 5
    #: Tasks taken into the in-flight list per round trip; also the most tasks a crash re-runs.
    prefetch: int = 1
    #: Tasks a holder runs before it yields the stream so other streams get a turn.
    batch_limit: int = 100
    #: How long a replica hands a task it has no function for back to others (rolling deploys)
    #: before dead-lettering it as ``unknown-task``.
    unknown_task_grace: float = 30.0
    #: Window in which a repeated dedup key returns the first task instead of enqueuing.
    dedup_window: float = 300.0
    #: Bounded retries of an enqueue while Redis is unreachable.
    enqueue_attempts: int = 5
    enqueue_timeout: float = 10.0
    serializer: Serializer = field(default_factory=JSONSerializer)
    #: Extra keyword arguments for the redis-py client / connection pool.
    redis_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.lease_ttl <= 0:
            raise ConfigurationError(f"lease_ttl must be positive, got {self.lease_ttl}")
        if not 0 < self.heartbeat <= self.lease_ttl / 3:
            raise ConfigurationError(
                f"heartbeat_interval ({self.heartbeat}) must be positive and at most "
                f"lease_ttl / 3 ({self.lease_ttl / 3:.3f}) so one late renewal does not lose a lease"
            )
        for name in ("poll_interval", "dedup_window", "enqueue_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"{name} must be positive, got {getattr(self, name)}")
        if self.unknown_task_grace < 0:
            raise ConfigurationError("unknown_task_grace must be >= 0")
        if self.prefetch > MAX_PREFETCH:
            raise ConfigurationError(f"prefetch must be at most {MAX_PREFETCH}, got {self.prefetch}")
        for name in ("max_deliveries", "prefetch", "batch_limit", "enqueue_attempts"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_limit < self.prefetch:
            raise ConfigurationError("batch_limit must be at least prefetch")

    @property
    def heartbeat(self) -> float:
        """The renewal interval in force."""
        if self.heartbeat_interval is None:
            return self.lease_ttl / 5
        return self.heartbeat_interval

    @property
    def lease_ttl_ms(self) -> int:
        return max(1, int(self.lease_ttl * 1000))

    def replace(self, **changes: Any) -> Settings:
        return replace(self, **changes)

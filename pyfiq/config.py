"""One frozen, validated settings object shared by the backend, the workers and the scripts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args
from urllib.parse import parse_qsl, urlencode, urlsplit

from .errors import ConfigurationError
from .serializers import JSONSerializer, Serializer

#: Lua's unpack() and one script's run time bound how many tasks one call may carry.
MAX_PREFETCH = 1000
#: The default ``prefetch`` of ``ack_mode="group"``: enough tasks buffered that a worker does
#: not wait for the next take while the previous one is on the wire, even for no-op tasks.
GROUP_PREFETCH = 32
#: How a lease holder acknowledges finished tasks (see ``Settings.ack_mode``).
AckMode = Literal["group", "inline"]
ACK_MODES: tuple[AckMode, ...] = get_args(AckMode)
#: The most replicas durable mode may wait for: more than any deployment has is a typo.
MAX_REPLICAS = 100

#: The longest time setting (about 31 years). Redis's clock plus a window this long stays an
#: exact integer in Lua's doubles and far below the 64-bit bound past which Redis refuses an
#: expire time.
MAX_SECONDS = 1_000_000_000


def validate_seconds(name: str, value: Any, *, redis_ms: bool = False, zero_ok: bool = False) -> float:
    """Return ``value`` if it is a usable number of seconds for setting ``name``, else raise.

    ``redis_ms``: the value goes to Redis as whole milliseconds (``PX``, script windows), and
    Redis refuses 0 there (``invalid expire time``), so it must come to at least 1 ms after
    the truncation pyfiq applies. Infinite and NaN values are refused everywhere: they turn
    into no timeout at all, a comparison that is always false, or an error deep in a worker.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value):
        raise ConfigurationError(f"{name} must be a finite number of seconds, got {value!r}")
    if value > MAX_SECONDS:
        raise ConfigurationError(f"{name} must be at most {MAX_SECONDS} seconds, got {value!r}")
    if redis_ms:
        if int(value * 1000) < 1:
            raise ConfigurationError(
                f"{name} must be at least 0.001 seconds, got {value!r}: Redis takes it as whole "
                f"milliseconds and refuses {int(value * 1000)} ms"
            )
    elif zero_ok:
        if value < 0:
            raise ConfigurationError(f"{name} must be >= 0 seconds, got {value!r}")
    elif value <= 0:
        raise ConfigurationError(f"{name} must be positive seconds, got {value!r}")
    return float(value)


#: Parts of an option's name that make its value a secret (matched case-insensitively).
SECRET_WORDS = ("password", "passwd", "secret", "token", "credential")


def is_secret_name(name: object) -> bool:
    """Whether an option (or URL query parameter) of this name holds a secret."""
    return isinstance(name, str) and any(word in name.lower() for word in SECRET_WORDS)


def redact_url(url: str) -> str:
    """``url`` with any password (in the authority, or a query parameter named like a secret)
    replaced by ``***``."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
        query = parts.query
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(is_secret_name(k) for k, _ in pairs):
            query = urlencode([(k, "***" if is_secret_name(k) else v) for k, v in pairs], safe="*")
    except ValueError:
        return "<unparsable url>"
    if parts.password is None and "@" in url and "@" not in parts.netloc:
        # Not scheme://user:password@host (a missing "//" or scheme, a typo): whatever comes
        # before the last "@" may be a password, so none of it is shown.
        return "***@" + url.rpartition("@")[2]
    if (netloc, query) == (parts.netloc, parts.query):
        return str(url)  # a plain string, also for a SecretURL
    # Built by hand: urlunsplit drops the empty authority of unix:///path URLs.
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


def redacted_repr(value: Any) -> str:
    """``repr(value)`` with every secret in it shown as ``***``: the values of secret-named keys
    of dicts (nested ones too) and the passwords of URLs."""
    if isinstance(value, dict):
        stars = repr("***")
        items = (f"{k!r}: {stars if is_secret_name(k) else redacted_repr(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(redacted_repr(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    if isinstance(value, str) and "://" in value:
        return repr(redact_url(value))
    return repr(value)


class Redacted(dict[str, Any]):
    """Connection options (credentials among them) whose repr says ``***`` for every secret:
    debuggers, ``pytest --showlocals`` and error trackers print reprs. Otherwise a plain dict."""

    def __repr__(self) -> str:
        return redacted_repr(dict(self))


class SecretURL(str):
    """A Redis URL as given, whose repr hides its password; its value is the URL itself."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(redact_url(self))


@dataclass(frozen=True)
class Settings:
    """pyfiq's configuration. Times are in seconds.

    Every replica that shares queues must agree on ``prefix``, ``shards`` and ``serializer``.
    """

    prefix: str = "pyfiq"
    #: Streams are spread over this many shards (hash tags); fixed for the life of the data.
    shards: int = 16
    #: A lease lapses this long after its last renewal: how long a crashed holder's streams
    #: wait, and how long a task may hold the GIL (or block the event loop) before its lease
    #: is lost and the task runs again elsewhere.
    lease_ttl: float = 5.0
    #: How often held leases are renewed; default ``lease_ttl / 5``.
    heartbeat_interval: float | None = None
    #: Safety poll of idle workers (Pub/Sub wake-ups are the fast path).
    poll_interval: float = 1.0
    #: A task handed out more than this many times (its consumer died each time) is poison.
    max_deliveries: int = 5
    #: How a holder acknowledges finished tasks. ``"group"``: in the background, all that
    #: finished meanwhile in one call that also takes more, while the next task already runs;
    #: a crash re-runs the tasks that finished within about one round trip before it.
    #: ``"inline"``: before taking more, so a crash re-runs at most ``prefetch`` tasks (one
    #: with its default ``prefetch`` of 1: the strict setting), at one round trip per take.
    ack_mode: AckMode = "group"
    #: Most tasks a holder has taken and not yet run; None: 32 for ``"group"``, 1 for ``"inline"``.
    prefetch: int | None = None
    #: Tasks a holder runs before it yields the stream so other streams get a turn.
    batch_limit: int = 100
    #: How long a replica hands a task it has no function for back to others (rolling deploys)
    #: before dead-lettering it as ``unknown-task``.
    unknown_task_grace: float = 30.0
    #: Window in which a repeated dedup key returns the first task instead of enqueuing.
    dedup_window: float = 300.0
    #: How long an enqueue keeps retrying while Redis is unreachable (long enough to ride out a
    #: failover or a restart), and optionally a cap on its attempts (None: only the window). Also
    #: the longest a caller waits behind a shared round trip before it gives up.
    enqueue_timeout: float = 10.0
    enqueue_attempts: int | None = None
    #: Default ``@fifo(time_limit=)``: an attempt running longer is interrupted and fails with
    #: ``TimeLimitExceeded``. None: no limit.
    time_limit: float | None = None
    #: Default ``@fifo(time_warning=)``: an attempt running longer logs ``pyfiq.task_running_long``
    #: once. None: no warning.
    time_warning: float | None = None
    #: Durable mode: each state change (enqueue, acquire, take and acknowledge, dead letter,
    #: release, an operator's skip or requeue) is followed by ``WAIT min_replicas`` on the same
    #: connection, so what Redis confirmed survives a failover to a replica. 0: off.
    min_replicas: int = 0
    #: How long one such ``WAIT`` waits for the replicas (durable mode only). Its reply is read
    #: with this on top of the connection's socket timeout, so it may exceed ``socket_timeout``
    #: (nothing to refuse: the two cannot conflict).
    replica_timeout: float = 1.0
    #: The largest task a call may enqueue, its arguments encoded, in bytes: a larger one is
    #: refused with ``PayloadTooLargeError`` before anything is sent (None: no limit). Redis
    #: holds every pending task in memory, and each one crosses the network twice.
    max_payload_bytes: int | None = 1_048_576
    #: The largest result a ``store_result`` function may return, encoded, in bytes: a larger
    #: one is not stored and its task is dead-lettered as ``result-refused``.
    result_max_bytes: int = 1_048_576
    serializer: Serializer = field(default_factory=JSONSerializer)
    #: Extra keyword arguments for the redis-py client / connection pool.
    redis_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Its repr, and so the settings', must not show a password it holds.
        object.__setattr__(self, "redis_options", Redacted(self.redis_options))
        validate_seconds("lease_ttl", self.lease_ttl, redis_ms=True)
        validate_seconds("dedup_window", self.dedup_window, redis_ms=True)
        for name in ("poll_interval", "enqueue_timeout"):
            validate_seconds(name, getattr(self, name))
        validate_seconds("unknown_task_grace", self.unknown_task_grace, zero_ok=True)
        for name in ("heartbeat_interval", "time_limit", "time_warning"):
            if getattr(self, name) is not None:
                validate_seconds(name, getattr(self, name))
        if not 0 < self.effective_heartbeat <= self.lease_ttl / 3:
            raise ConfigurationError(
                f"heartbeat_interval ({self.effective_heartbeat}) must be positive and at most "
                f"lease_ttl / 3 ({self.lease_ttl / 3:.3f}) so one late renewal does not lose a lease"
            )
        if self.ack_mode not in ACK_MODES:
            raise ConfigurationError(f"ack_mode must be one of {', '.join(ACK_MODES)}, got {self.ack_mode!r}")
        if self.prefetch is not None and self.prefetch > MAX_PREFETCH:
            raise ConfigurationError(f"prefetch must be at most {MAX_PREFETCH}, got {self.prefetch}")
        if self.max_payload_bytes is not None and self.max_payload_bytes < 1:
            raise ConfigurationError(f"max_payload_bytes must be at least 1 or None, got {self.max_payload_bytes}")
        for name in ("max_deliveries", "prefetch", "batch_limit", "enqueue_attempts", "result_max_bytes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be at least 1, got {getattr(self, name)}")
        self._validate_durable()
        if self.batch_limit < self.effective_prefetch:
            raise ConfigurationError(f"batch_limit must be at least prefetch ({self.effective_prefetch})")

    def _validate_durable(self) -> None:
        replicas = self.min_replicas
        if isinstance(replicas, bool) or not isinstance(replicas, int) or not 0 <= replicas <= MAX_REPLICAS:
            raise ConfigurationError(f"min_replicas must be a whole number from 0 to {MAX_REPLICAS}, got {replicas!r}")
        # WAIT takes whole milliseconds and reads 0 as "wait forever": at least 1 ms.
        validate_seconds("replica_timeout", self.replica_timeout, redis_ms=True)
        if self.durable and self.replica_timeout > self.lease_ttl / 3:
            # A lease counts from its acquire's send, and the acquire waits for replicas too.
            raise ConfigurationError(
                f"replica_timeout ({self.replica_timeout}) must be at most lease_ttl / 3 "
                f"({self.lease_ttl / 3:.3f}) so a lease acquired while replicas lag keeps most of its time"
            )

    @property
    def durable(self) -> bool:
        """Whether state changes wait for ``min_replicas`` replicas."""
        return self.min_replicas > 0

    @property
    def replica_timeout_ms(self) -> int:
        return int(self.replica_timeout * 1000)

    @property
    def effective_prefetch(self) -> int:
        """The ``prefetch`` in force."""
        if self.prefetch is not None:
            return self.prefetch
        return GROUP_PREFETCH if self.ack_mode == "group" else 1

    @property
    def effective_heartbeat(self) -> float:
        """The renewal interval in force."""
        if self.heartbeat_interval is None:
            return self.lease_ttl / 5
        return self.heartbeat_interval

    @property
    def lease_ttl_ms(self) -> int:
        return max(1, int(self.lease_ttl * 1000))

    def replace(self, **changes: Any) -> Settings:
        return replace(self, **changes)

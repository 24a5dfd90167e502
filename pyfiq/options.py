"""What ``@fifo`` accepts, stated once: ``FifoOptions`` (validated when made) and the
``RetryPolicy`` it derives from ``retry`` / ``max_retries`` / ``retry_wait``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

from tenacity import (
    BaseRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_never,
    wait_exponential,
    wait_fixed,
    wait_random,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from .config import validate_seconds
from .engine.keys import validate_queue_name
from .engine.protocol import RateLimit
from .errors import ConfigurationError, TimeLimitExceeded

OnExhausted = Literal["dead-letter", "block"]


class RetryPolicy:
    """The tenacity stop/wait/retry triple a task runs under."""

    # tenacity accepts its policy objects or plain callables of a RetryCallState.
    def __init__(self, stop: Any, wait: Any, retry: Any, forever: bool) -> None:
        self.stop, self.wait, self.retry, self.forever = stop, wait, retry, forever

    @classmethod
    def build(
        cls,
        retry: BaseRetrying | None,
        max_retries: int | None,
        retry_wait: float | None,
    ) -> RetryPolicy:
        if retry is not None:
            if max_retries is not None or retry_wait is not None:
                raise ConfigurationError("give either retry= or max_retries=/retry_wait=, not both")
            if not isinstance(retry, BaseRetrying):
                raise ConfigurationError(
                    "retry= takes a tenacity Retrying object, e.g. "
                    "Retrying(stop=stop_after_attempt(5), wait=wait_exponential_jitter())"
                )
            return cls(retry.stop, retry.wait, retry.retry, retry.stop is stop_never)
        if max_retries is not None and (not isinstance(max_retries, int) or max_retries < -1):
            raise ConfigurationError(f"max_retries must be an int >= -1, got {max_retries!r}")
        if retry_wait is not None and retry_wait < 0:
            raise ConfigurationError(f"retry_wait must be >= 0, got {retry_wait!r}")
        retries = 3 if max_retries is None else max_retries
        wait: wait_base = (
            wait_exponential(multiplier=1, max=30) + wait_random(0, 1) if retry_wait is None else wait_fixed(retry_wait)
        )
        stop: stop_base = stop_never if retries == -1 else stop_after_attempt(retries + 1)
        # A time limit is a BaseException (a task's `except Exception` must not swallow it),
        # and still a failed attempt like any other.
        return cls(stop, wait, retry_if_exception_type((Exception, TimeLimitExceeded)), retries == -1)


@dataclasses.dataclass(frozen=True)
class FifoOptions:
    """Everything ``@fifo(...)`` was told about one function, refused when made if it cannot work.

    The fields are ``fifo``'s keywords, one for one (a test keeps them so); see ``Registry.fifo``
    for what each means. ``policy`` and ``rate`` are derived from them: the retry policy the
    task runs under, and the queue's rate limit (``None``: unlimited).
    """

    queue: str | None = None
    name: str | None = None
    retry: BaseRetrying | None = None
    max_retries: int | None = None
    retry_wait: float | None = None
    on_success: Callable[..., Any] | None = None
    on_error: Callable[..., Any] | None = None
    on_exhausted: OnExhausted = "dead-letter"
    expires_in: float | None = None
    key: Callable[..., Any] | None = None
    allow_none_key: bool = False
    rate_limit: float | None = None
    rate_burst: int = 1
    time_limit: float | None = None
    time_warning: float | None = None
    store_result: bool = False
    result_ttl: float = 3600.0
    policy: RetryPolicy = dataclasses.field(init=False, repr=False, compare=False)
    rate: RateLimit | None = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.queue is None:
            raise ConfigurationError("@fifo needs a queue name: @fifo(queue='billing')")
        if not isinstance(self.queue, str):
            raise ConfigurationError(
                f"@fifo needs a queue name, got {self.queue!r}: "
                "write @fifo(queue='billing') (with parentheses), not a bare @fifo"
            )
        # Frozen: the derived and normalised values can only be set through object's own setter.
        set_ = object.__setattr__
        set_(self, "policy", RetryPolicy.build(self.retry, self.max_retries, self.retry_wait))
        set_(self, "rate", self._rate())
        for seconds in ("time_limit", "time_warning"):
            if (value := getattr(self, seconds)) is not None:
                set_(self, seconds, validate_seconds(seconds, value))
        validate_queue_name(self.queue)
        if not isinstance(self.store_result, bool):
            raise ConfigurationError(f"store_result must be True or False, got {self.store_result!r}")
        set_(self, "result_ttl", validate_seconds("result_ttl", self.result_ttl, redis_ms=True))
        if self.on_exhausted not in ("dead-letter", "block"):
            raise ConfigurationError(f"on_exhausted must be 'dead-letter' or 'block', got {self.on_exhausted!r}")

    def _rate(self) -> RateLimit | None:
        if self.rate_limit is None:
            return None
        if not self.rate_limit > 0 or self.rate_burst < 1:
            raise ConfigurationError(
                f"rate_limit must be > 0 and rate_burst >= 1, got {self.rate_limit}, {self.rate_burst}"
            )
        return RateLimit(float(self.rate_limit), int(self.rate_burst))

    @property
    def queue_name(self) -> str:
        """``queue``, which the options only hold once it names a valid queue."""
        return str(self.queue)

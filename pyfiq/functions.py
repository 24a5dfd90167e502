"""The application's ``@fifo`` functions: ``FifoFunction`` (a function bound to a queue; calling
it enqueues) and the ``Registry`` that knows them and the backend they enqueue to.

A default registry serves ``@pyfiq.fifo``, ``pyfiq.configure`` and ``pyfiq.get_backend``;
an application (or a test) that wants its tasks apart from the rest of the process makes its own.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import inspect
import re
import threading
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, Generic, ParamSpec, Protocol, TypeVar, cast, overload

from tenacity import BaseRetrying

from . import hooks
from .backend.backend import RedisQueueBackend
from .deferred import ENQUEUE_CHUNK, RESEND_UNSENT, Deferrer, Pending, send
from .engine.keys import stream_name, validate_key, validate_queue_name
from .engine.outcomes import describe_error
from .engine.protocol import RateLimit
from .engine.ticks import Schedule
from .errors import ConfigurationError, NotConfiguredError
from .logs import log
from .options import FifoOptions, OnExhausted, RetryPolicy
from .periodic import Periodic
from .task import (
    ID_LENGTH,
    NOW,
    EncodedTask,
    TaskHandle,
    TaskRecord,
    check_payload,
    due_spec,
    encode_record,
    expires_in_ms,
    new_task_id,
    new_task_ids,
)

__all__ = [
    "ENQUEUE_CHUNK",
    "FifoFunction",
    "FifoOptions",
    "Registry",
    "RetryPolicy",
    "configure",
    "default_registry",
    "fifo",
    "get_backend",
]

P = ParamSpec("P")
Q = ParamSpec("Q")
R = TypeVar("R")
T = TypeVar("T")


class Bind(Protocol):
    """What ``@fifo(...)`` returns: binds a function, typed by what the function gives back,
    so ``handle.result()`` of an ``async def f() -> T`` task is a ``T``, not its coroutine."""

    @overload
    def __call__(self, func: Callable[P, Coroutine[Any, Any, T]], /) -> FifoFunction[P, T]: ...

    @overload
    def __call__(self, func: Callable[P, T], /) -> FifoFunction[P, T]: ...


class Registry(Periodic):
    """The ``@fifo`` functions of one application, and the backend they enqueue to.

    ``registry.fifo(...)`` binds a function to a queue in this registry; a worker made with
    ``registry=`` runs only this registry's tasks (any other task name is unknown to it) and,
    unless given ``queues``, consumes only this registry's queues. Two registries in one
    process therefore do not see each other's tasks. ``@pyfiq.fifo``, ``pyfiq.configure`` and
    ``pyfiq.get_backend`` are the default registry's.

    Hook listeners (``pyfiq.hooks``) and ``memory://`` servers stay process-wide: hooks observe
    the process, whichever registry a task belongs to, and backends with the same
    ``memory://name`` share one dataset.
    """

    def __init__(self, backend: RedisQueueBackend | None = None) -> None:
        self._functions: dict[str, FifoFunction[Any, Any]] = {}
        self._lock = threading.Lock()
        self._backend = backend
        #: Set by ``pyfiq.testing.eager()``: the calls of this registry's functions run at once,
        #: through it (its ``run`` and ``arun``), instead of being enqueued.
        self.eager: Any = None
        #: Installed by an integration (``pyfiq.contrib.django``: hold a call made inside a
        #: database transaction until it commits): asked at each enqueue whether it takes the
        #: call's tasks to send later (see ``pyfiq.deferred``).
        self.deferrer: Deferrer | None = None

    def __repr__(self) -> str:
        return f"<Registry of {len(self._functions)} functions on {self.registered_queues()}>"

    def configure(self, backend: RedisQueueBackend) -> None:
        """Set the backend that the registry's functions enqueue to (``pyfiq.configure``: the
        default registry's, which ``@pyfiq.fifo`` functions use)."""
        self._backend = backend

    def get_backend(self) -> RedisQueueBackend:
        """The registry's backend (see ``configure``); ``NotConfiguredError`` if there is none."""
        if self._backend is None:
            raise NotConfiguredError(
                "pyfiq has no backend: call pyfiq.configure(backend=RedisQueueBackend(url)) or "
                "start a worker with threaded_worker(backend=...) before enqueuing"
            )
        return self._backend

    def fifo(
        self,
        queue: str | None = None,
        *,
        name: str | None = None,
        retry: BaseRetrying | None = None,
        max_retries: int | None = None,
        retry_wait: float | None = None,
        on_success: Callable[..., Any] | None = None,
        on_error: Callable[..., Any] | None = None,
        on_exhausted: OnExhausted = "dead-letter",
        expires_in: float | None = None,
        key: Callable[..., Any] | None = None,
        allow_none_key: bool = False,
        rate_limit: float | None = None,
        rate_burst: int = 1,
        time_limit: float | None = None,
        time_warning: float | None = None,
        store_result: bool = False,
        result_ttl: float = 3600.0,
    ) -> Bind:
        """Bind a function to an ordered queue; calling it then enqueues a task.

        - ``name``: the task name stored in Redis (default ``module.qualname``); set it so that
          moving the function does not strand queued tasks.
        - ``max_retries`` / ``retry_wait``: retries in place (the queue waits); ``-1`` retries
          forever. ``retry``: a tenacity ``Retrying`` whose stop/wait/retry are used instead.
        - ``on_success(result, task, binding)`` after success; ``on_error(exc, task, binding)``
          after every failed attempt. ``task`` is the ``TaskContext``, ``binding`` this function.
        - ``on_exhausted``: ``"dead-letter"`` (default) or ``"block"``: keep retrying with the
          policy's waits, holding the queue, until the task succeeds or an operator steps in.
        - ``expires_in``: seconds after enqueue past which the task is dead-lettered unrun.
        - ``key``: a function of the call's arguments naming the ordered stream within the queue;
          its ``str()`` has at most 200 characters and 512 bytes of UTF-8 and no control
          characters, or the call raises ``ConfigurationError`` and stores nothing. A key
          function that raises, or returns None, is a ``ConfigurationError`` naming the task
          and the function, and stores nothing; with ``allow_none_key=True`` a None sends the
          task to the queue's own (unkeyed) stream.
        - ``rate_limit``: at most this many task starts per second on the queue, across every
          replica and stream; ``rate_burst`` starts may follow each other without spacing.
        - ``time_limit``: seconds an attempt may run; past them an ``async def`` task is cancelled
          and a plain function gets ``TimeLimitExceeded`` raised in its thread, a failed attempt.
          ``time_warning``: seconds after which a running attempt logs ``pyfiq.task_running_long``
          once. Both default to the backend's settings (off).
        - ``store_result``: keep what the function returns (through the backend's serializer,
          written by the script that acknowledges the task) for ``result_ttl`` seconds, so
          ``handle.result()`` can wait for it from any process. A result larger than
          ``Settings.result_max_bytes``, or one the serializer refuses, is not stored: the task
          is dead-lettered as ``result-refused``.

        The options are checked here, before any function is bound (``FifoOptions``).
        """
        options = FifoOptions(
            queue,
            name=name,
            retry=retry,
            max_retries=max_retries,
            retry_wait=retry_wait,
            on_success=on_success,
            on_error=on_error,
            on_exhausted=on_exhausted,
            expires_in=expires_in,
            key=key,
            allow_none_key=allow_none_key,
            rate_limit=rate_limit,
            rate_burst=rate_burst,
            time_limit=time_limit,
            time_warning=time_warning,
            store_result=store_result,
            result_ttl=result_ttl,
        )

        def bind(func: Callable[P, Any]) -> FifoFunction[P, Any]:
            return self._add(FifoFunction(func, options, registry=self))

        return cast(Bind, bind)

    def _add(self, binding: FifoFunction[P, R]) -> FifoFunction[P, R]:
        """Register ``binding`` under its task name; a name taken by another function warns and
        is taken over (the last definition wins, as a module reloaded in place expects)."""
        with self._lock:
            existing = self._functions.get(binding.name)
            if existing is not None and existing.func is not binding.func:
                log.warning("pyfiq.task_redefined", task=binding.name, queue=binding.queue)
            self._functions[binding.name] = binding
        return binding

    # -- what a worker's scheduler asks (the engine's TaskDirectory) ---------------------

    def lookup(self, name: str) -> FifoFunction[Any, Any] | None:
        """The function registered as ``name``, or None: a task this registry cannot run."""
        return self._functions.get(name)

    def registered_queues(self) -> list[str]:
        """The queues of this registry's functions: what its workers consume by default."""
        return sorted({f.queue for f in list(self._functions.values())})

    def rate_limit_of(self, queue: str) -> RateLimit | None:
        """The strictest rate limit any function of ``queue`` declares."""
        limits = [f.rate_limit for f in list(self._functions.values()) if f.queue == queue and f.rate_limit]
        return min(limits, key=lambda r: (r.per_second, r.burst)) if limits else None


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class FifoFunction(Generic[P, R]):
    """A function bound to a queue. Calling it enqueues; ``.func`` is the plain function. ``R``
    is what a run returns (an ``async def`` function's awaited value), which
    ``TaskHandle[R].result()`` gives back."""

    def __init__(self, func: Callable[P, Any], options: FifoOptions, *, registry: Registry | None = None) -> None:
        self.func = func
        self.options = options
        #: Where it is registered, and so which backend a call without ``backend=`` enqueues to.
        self.registry = default_registry if registry is None else registry
        self.queue = options.queue_name
        self.name = options.name or f"{func.__module__}.{func.__qualname__}"
        # The engine and the enqueue paths read these off the binding, not off the options.
        self.policy: RetryPolicy = options.policy
        self.rate_limit = options.rate
        self.on_success = options.on_success
        self.on_error = options.on_error
        self.on_exhausted: OnExhausted = options.on_exhausted
        self.expires_in = options.expires_in
        self.key = options.key
        self.allow_none_key = options.allow_none_key
        self.time_limit = options.time_limit
        self.time_warning = options.time_warning
        self.store_result = options.store_result
        self.result_ttl = options.result_ttl
        #: Its periodic schedule (``periodic``), or None.
        self.schedule: Schedule | None = None
        self.is_async = inspect.iscoroutinefunction(func)
        self._signature = inspect.signature(func)
        #: How many positional arguments a call may give with no keywords and need no binding
        #: check: exactly the plain parameters, when all are plain and none has a default.
        self._plain_arity = _plain_arity(self._signature)
        functools.update_wrapper(self, func)

    def __repr__(self) -> str:
        return f"<fifo {self.name} queue={self.queue!r}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Enqueue a call. For an ``async def`` function called inside a running event loop
        this returns an awaitable (``await deliver(...)``) that enqueues without blocking the
        loop; everywhere else it enqueues at once and returns the ``TaskHandle``."""
        if self.is_async and _loop_running():
            return self.asend_with_options(args=args, kwargs=kwargs)
        return self.send_with_options(args=args, kwargs=kwargs)

    async def aenqueue(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]:
        """Enqueue from asyncio code without blocking the loop, whatever the function is (plain
        ``def`` or ``async def``): one spelling for an endpoint that need not know."""
        return await self.asend_with_options(args=args, kwargs=kwargs)

    def send_with_options(
        self,
        *,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        key: str | None = None,
        dedup_key: str | None = None,
        expires_in: float | None = None,
        delay: float | dt.timedelta | None = None,
        eta: dt.datetime | None = None,
        backend: RedisQueueBackend | None = None,
        on_commit: bool = True,
    ) -> TaskHandle[R]:
        """Enqueue with per-call options: an explicit stream ``key``, a ``dedup_key`` (within
        the backend's dedup window a repeat returns the first task's handle), ``expires_in``
        seconds after which the task is dead-lettered as expired instead of run.

        ``delay`` (seconds or a ``timedelta``) or ``eta`` (an aware ``datetime``): the task joins
        its stream then, by Redis's clock, behind every task enqueued to the stream before that
        moment and ahead of every one enqueued after it; until then it is ``scheduled``.
        ``expires_in`` still counts from now, so one that ends before the due time is refused.

        Where the registry has a ``deferrer`` (the Django integration, inside a transaction) the
        call is checked and encoded now and sent when it says (at the commit); the handle has
        the task's id at once. ``on_commit=False`` sends it now all the same."""
        if self.registry.eager is not None:
            options = {"dedup_key": dedup_key, "expires_in": expires_in, "delay": delay, "eta": eta}
            return self.registry.eager.run(self, args, kwargs or {}, key, **options)  # type: ignore[no-any-return]
        backend, stream, items, dedup = self._encode(args, kwargs, key, dedup_key, expires_in, delay, eta, backend)
        if on_commit and (held := self._held(backend, stream, items, dedup_key)) is not None:
            return held
        ((task_id, new),) = backend.enqueuer.enqueue(stream, items, dedup)
        if new:
            hooks.dispatcher.on_enqueue(self.queue, 1)
        return TaskHandle(task_id, self.queue, stream, self.name, duplicate=not new, backend=backend)

    async def asend_with_options(
        self,
        *,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        key: str | None = None,
        dedup_key: str | None = None,
        expires_in: float | None = None,
        delay: float | dt.timedelta | None = None,
        eta: dt.datetime | None = None,
        backend: RedisQueueBackend | None = None,
        on_commit: bool = True,
    ) -> TaskHandle[R]:
        """``send_with_options`` on the backend's ``redis.asyncio`` client."""
        if self.registry.eager is not None:
            options = {"dedup_key": dedup_key, "expires_in": expires_in, "delay": delay, "eta": eta}
            return await self.registry.eager.arun(self, args, kwargs or {}, key, **options)  # type: ignore[no-any-return]
        backend, stream, items, dedup = self._encode(args, kwargs, key, dedup_key, expires_in, delay, eta, backend)
        if on_commit and (held := self._held(backend, stream, items, dedup_key)) is not None:
            return held
        ((task_id, new),) = await backend.enqueuer.aenqueue(stream, items, dedup)
        if new:
            hooks.dispatcher.on_enqueue(self.queue, 1)
        return TaskHandle(task_id, self.queue, stream, self.name, duplicate=not new, backend=backend)

    def _held(
        self, backend: RedisQueueBackend, stream: str, items: list[EncodedTask], dedup_key: str | None
    ) -> TaskHandle[R] | None:
        """The call's handle if the registry's deferrer took its task to send later, else None."""
        deferrer = self.registry.deferrer
        if deferrer is None:
            return None
        handle: TaskHandle[R] = TaskHandle(items[0].id, self.queue, stream, self.name, backend=backend)
        return handle if deferrer.defer([Pending(handle, items[0], dedup_key)]) else None

    def handle(
        self, task_id: str, *, key: str | None = None, backend: RedisQueueBackend | None = None
    ) -> TaskHandle[R]:
        """The handle of a task of this function enqueued earlier, perhaps by another process or
        request, rebuilt from its id: ``key`` names its stream in a keyed queue (the one its
        ``key`` function gave). Asks ``backend`` (default: this function's registry's)."""
        return _handle(task_id, self.queue, key, self.name, backend or self.registry.get_backend())

    def check_call(self, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        """Refuse, before anything is stored, a call the function could never accept (wrong
        arity, unknown keyword): it would fail on every attempt and hold its queue meanwhile."""
        if not kwargs and len(args) == self._plain_arity:
            return  # the common case, without bind()'s cost on every enqueue
        try:
            self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}{self._signature}: {exc}; nothing was enqueued") from None

    def key_of(self, args: Sequence[Any], kwargs: dict[str, Any]) -> str | None:
        """The stream key of a call: what the ``key`` function returns, validated (None: the
        function has no key function). Its failure is the caller's, named."""
        if self.key is None:
            return None
        fn = getattr(self.key, "__qualname__", repr(self.key))
        try:
            raw = self.key(*args, **kwargs)
        except Exception as exc:
            raise ConfigurationError(
                f"the key function {fn} of task {self.name} raised {describe_error(exc)}; nothing was enqueued"
            ) from exc
        if raw is None:
            if self.allow_none_key:
                return None
            raise ConfigurationError(
                f"the key function {fn} of task {self.name} returned None; nothing was enqueued (return a "
                "key, or pass allow_none_key=True to send such calls to the queue's unkeyed stream)"
            )
        return validate_key(str(raw))

    def _encode(
        self,
        args: Sequence[Any],
        kwargs: dict[str, Any] | None,
        key: str | None,
        dedup_key: str | None,
        expires_in: float | None,
        delay: float | dt.timedelta | None,
        eta: dt.datetime | None,
        backend: RedisQueueBackend | None,
    ) -> tuple[RedisQueueBackend, str, list[EncodedTask], list[str] | None]:
        kwargs = kwargs or {}
        self.check_call(args, kwargs)
        when = due_spec(delay, eta)
        key = validate_key(str(key)) if key is not None else self.key_of(args, kwargs)
        backend = backend or self.registry.get_backend()
        record = TaskRecord(self.name, list(args), dict(kwargs), key, hooks.dispatcher.enqueue_headers(self.queue))
        expires = expires_in if expires_in is not None else self.expires_in
        items = backend.encode([(new_task_id(), record)], expires, when)
        return backend, stream_name(self.queue, key), items, [dedup_key] if dedup_key is not None else None

    def enqueue_many(
        self,
        calls: Iterable[Sequence[Any]],
        *,
        backend: RedisQueueBackend | None = None,
        batch_id: str | None = None,
        on_commit: bool = True,
    ) -> list[TaskHandle[R]]:
        """Enqueue one task per positional-argument tuple, in order, in as few round trips as
        possible (one per stream and ``ENQUEUE_CHUNK`` tasks). Every call is encoded before
        anything is sent, so one bad argument enqueues nothing.

        Each round trip is atomic, the batch as a whole is not. If Redis becomes unreachable
        (or refuses a chunk) part-way, sending stops at once, so no stream gets a later chunk
        without an earlier one, and ``PartialEnqueueError`` (a ``BackendUnavailableError``)
        lists, by index into ``calls``, which calls Redis confirmed (``accepted``, with their
        handles), which were sent without a reply and may be stored (``unknown``) and which
        were never sent (``unsent``).

        ``batch_id`` makes re-sending safe. Call ``i`` is enqueued under the dedup key
        ``f"{batch_id}:{i}"`` (the keys of ``send_with_options(dedup_key=...)``, per stream),
        so calling ``enqueue_many`` again with the same calls, in the same order, and the same
        ``batch_id`` within the backend's ``dedup_window`` stores only the calls Redis does not
        hold yet, and returns the others' handles with ``duplicate=True``. It also keeps the
        automatic retry of a chunk whose reply was lost from storing it twice. It costs Redis
        a key per task for ``dedup_window``, so it is off by default; without it, only the
        ``unsent`` calls can be sent again without risk of running twice.

        Where the registry has a ``deferrer`` (the Django integration, inside a transaction),
        the calls are checked and encoded now and sent together when it says (at the commit),
        with these same semantics there; ``on_commit=False`` sends them now all the same.
        """
        if self.registry.eager is not None:
            return [self.registry.eager.run(self, tuple(args), {}, None) for args in calls]
        backend = backend or self.registry.get_backend()
        if batch_id is not None and (not isinstance(batch_id, str) or not batch_id):
            raise ConfigurationError(f"batch_id must be a non-empty string, got {batch_id!r}")
        pending: list[Pending] = []
        headers = hooks.dispatcher.enqueue_headers(self.queue)
        serializer = backend.settings.serializer
        ttl_ms = expires_in_ms(self.expires_in)
        calls = list(calls)
        for index, (args, task_id) in enumerate(zip(calls, new_task_ids(len(calls)), strict=True)):
            self.check_call(args, {})
            key = self.key_of(args, {})
            stream = stream_name(self.queue, key)
            payload = encode_record(serializer, self.name, list(args), {}, key, headers)
            check_payload(self.name, payload, backend.settings.max_payload_bytes)
            handle: TaskHandle[R] = TaskHandle(task_id, self.queue, stream, self.name, backend=backend)
            dedup = None if batch_id is None else f"{batch_id}:{index}"
            pending.append(Pending(handle, EncodedTask(task_id, ttl_ms, NOW, payload), dedup))
        deferrer = self.registry.deferrer
        if on_commit and pending and deferrer is not None and deferrer.defer(pending):
            return [p.handle for p in pending]
        advice = (
            f"call enqueue_many again with the same calls and batch_id={batch_id!r} to store exactly the rest"
            if batch_id is not None
            else f"{RESEND_UNSENT}, or pass batch_id= to make re-sending the whole batch safe"
        )
        return send(pending, advice=advice)


def _plain_arity(signature: inspect.Signature) -> int:
    params = list(signature.parameters.values())
    plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if all(p.kind in plain and p.default is inspect.Parameter.empty for p in params):
        return len(params)
    return -1


#: The registry of ``@pyfiq.fifo``: what a worker made without ``registry=`` runs.
#: What a task id is (``new_task_id``): checked before a handle is made from one a caller gives.
_TASK_ID = re.compile(rf"[0-9a-f]{{{ID_LENGTH}}}")


def _handle(task_id: str, queue: str, key: str | None, name: str, backend: RedisQueueBackend) -> TaskHandle[Any]:
    if not isinstance(task_id, str) or not _TASK_ID.fullmatch(task_id):
        raise ConfigurationError(
            f"{task_id!r} is not a task id: pyfiq's ids are {ID_LENGTH} lowercase hex digits (TaskHandle.id)"
        )
    stream = stream_name(validate_queue_name(queue), None if key is None else validate_key(str(key)))
    return TaskHandle(task_id, queue, stream, name, backend=backend)


def handle(
    task_id: str, *, queue: str, key: str | None = None, backend: RedisQueueBackend | None = None
) -> TaskHandle[Any]:
    """The handle of task ``task_id`` on ``queue`` (and keyed stream ``key``), rebuilt from its
    id in any process: ``pyfiq.handle(task_id, queue="billing").status()``. ``backend``: where to
    ask (default: the default registry's). ``FifoFunction.handle`` does the same for one function."""
    return _handle(task_id, queue, key, "", backend or default_registry.get_backend())


class FifoDecorator(Generic[P, Q]):
    """``pyfiq.fifo``: ``@fifo(queue=...)`` binds a function to a queue (``Registry.fifo``), and
    ``@fifo.periodic(...)`` one that also runs on a schedule (``Registry.periodic``)."""

    def __init__(self, bind: Callable[P, Bind], periodic: Callable[Q, Bind]) -> None:
        self._bind = bind
        self.periodic = periodic
        functools.update_wrapper(self, bind)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Bind:
        return self._bind(*args, **kwargs)


default_registry = Registry()
fifo = FifoDecorator(default_registry.fifo, default_registry.periodic)
configure = default_registry.configure
get_backend = default_registry.get_backend

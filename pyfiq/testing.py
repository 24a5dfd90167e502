"""What an application's own test suite needs to test code that uses pyfiq.

- ``memory_backend()``: a fresh embedded in-process Redis (fakeredis with Lua, the
  ``pyfiq[memory]`` extra), isolated from every other test, made the backend of the default
  registry (or of the ``registry`` given) so ``@fifo`` functions enqueue to it.
- ``eager()``: within it, calling a ``@fifo`` function runs it at once, in the caller's thread,
  its arguments through the serializer and back as a worker would see them, its error raised.
- ``drain(backend, queues)``: run a real worker until the given queues hold no task, so a test
  can call ``charge(...)`` and then assert on what the task did; a task that failed (was
  dead-lettered) fails the test with ``TasksFailed``, and retries do not wait out back-offs.

Never imported by pyfiq itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import hooks
from .backend.backend import RedisQueueBackend
from .config import Settings
from .engine.keys import queue_of, stream_name, validate_key
from .errors import ConfigurationError, NotConfiguredError
from .functions import Registry, default_registry
from .hooks import Hooks
from .serializers import JSONSerializer, Serializer
from .task import (
    TaskContext,
    TaskHandle,
    TaskRecord,
    due_spec,
    encode_tasks,
    new_task_id,
    reset_current,
    set_current,
)
from .workers.threaded import ThreadedWorker

__all__ = ["EagerHandle", "Failure", "TasksFailed", "drain", "eager", "memory_backend"]

#: Settings that make tests fast: short leases and polls, few shards.
FAST: dict[str, Any] = {"lease_ttl": 1.0, "poll_interval": 0.05, "shards": 2, "unknown_task_grace": 0.5}


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


def _holding(backend: RedisQueueBackend, queues: list[str]) -> str:
    streams = [s for s in backend.active_streams() if queue_of(s) in queues]
    return ", ".join(streams[:10]) + (f" and {len(streams) - 10} more" if len(streams) > 10 else "") or "none"


@dataclass(frozen=True)
class Failure:
    """A task dead-lettered while ``drain()`` ran."""

    stream: str
    task_id: str | None
    #: The task's registered name, when its record could be read.
    task: str | None
    #: As in the dead letter: ``exhausted`` (it raised on its last attempt), ``expired``,
    #: ``unknown-task``, ``undecodable``, ``poison``...
    reason: str
    #: The error the dead letter records, as text ("ValueError: bad input" for a task that raised).
    error: str | None
    #: The exception its last attempt raised, when this process ran it.
    exception: BaseException | None


class TasksFailed(AssertionError):
    """Tasks failed while ``drain()`` ran: ``failures`` lists them, oldest first. An
    ``AssertionError``, so a test runner reports it as the test's failure; the first failure's
    exception is its ``__cause__``, with its traceback."""

    def __init__(self, failures: list[Failure]) -> None:
        self.failures = failures
        first = failures[0]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        super().__init__(
            f"task {first.task or '?'} {first.task_id or ''} on stream {first.stream!r} failed: "
            f"{first.reason}: {first.error or 'no error recorded'}{more}"
        )


class _LastErrors(Hooks):
    """The exception of each task's latest failed attempt, by task id."""

    def __init__(self) -> None:
        self.errors: dict[str, BaseException] = {}

    def on_failure(self, ctx: TaskContext, error: BaseException) -> None:
        self.errors[ctx.id] = error


def _dead_counts(backend: RedisQueueBackend, queues: list[str]) -> dict[str, int]:
    streams = [s for s in backend.dead_letter_streams() if queue_of(s) in queues]
    return {s: int(backend.queue_info(s)["dead"]) for s in streams}


def _new_failures(
    backend: RedisQueueBackend, queues: list[str], before: dict[str, int], errors: dict[str, BaseException]
) -> list[Failure]:
    found: list[tuple[float, Failure]] = []
    for stream, count in _dead_counts(backend, queues).items():
        seen = before.get(stream, 0)
        for letter in backend.dead_letters(stream, limit=max(count - seen, 1), offset=seen):
            task_id = letter.entry.id if letter.entry is not None else None
            task = letter.record.name if letter.record is not None else None
            error = letter.header.get("error")
            kind = str(letter.header.get("error_type", "")).rpartition(".")[2]
            if error is not None and kind:
                error = f"{kind}: {error}"
            failure = Failure(stream, task_id, task, letter.reason, error, errors.get(task_id or ""))
            found.append((float(letter.header.get("at_ms", 0)), failure))
    return [failure for _, failure in sorted(found, key=lambda pair: pair[0])]


def drain(
    backend: RedisQueueBackend,
    queues: Iterable[str],
    *,
    timeout: float = 10.0,
    concurrency: int = 4,
    registry: Registry | None = None,
    raise_failures: bool = True,
    retry_waits: bool = False,
) -> list[Failure]:
    """Run a worker of ``registry`` (default: the registry of ``@pyfiq.fifo``) on ``queues``
    until none of their streams holds a task (done or dead-lettered), delayed ones included,
    then stop it.

    A task dead-lettered meanwhile (it raised on its last attempt, expired, had no function...)
    fails the test: ``TasksFailed`` is raised, naming them, with the first one's exception as
    its cause. With ``raise_failures=False`` they are returned instead (an empty list: every
    task succeeded). Retries run at once, whatever their policy's back-off, unless
    ``retry_waits=True``. Raises ``TimeoutError`` if the queues are not drained within
    ``timeout`` seconds (a task that blocks its queue, or one delayed beyond it)."""
    names = list(queues)
    deadline = time.monotonic() + timeout
    before = _dead_counts(backend, names)
    last = _LastErrors()
    hooks.add(last)
    try:
        worker = ThreadedWorker(backend, registry=registry, queues=names, concurrency=concurrency)
        if not retry_waits:
            worker.max_retry_wait = 0.0
        with worker:
            # Idle twice in a row: a task that ended during one look (its stream read as done)
            # enqueued whatever it enqueues before it ended, so the next look sees it.
            idle_looks = 0
            while idle_looks < 2:
                idle_looks = idle_looks + 1 if _idle(backend, names) else 0
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"queues {names} still hold tasks after {timeout}s: {_holding(backend, names)} (a task "
                        "whose function is not registered here waits unknown_task_grace before it is dead-lettered)"
                    )
                time.sleep(0.01)
    finally:
        hooks.remove(last)
    failures = _new_failures(backend, names, before, last.errors)
    if failures and raise_failures:
        raise TasksFailed(failures) from failures[0].exception
    return failures


@dataclass(frozen=True)
class EagerHandle(TaskHandle[Any]):
    """What a call returns in ``eager()`` mode: ``result()`` is what the task returned (through
    the serializer, as a stored result would be). A call made by a running task runs once that
    task has ended, as a worker would run it: its handle has its result from then on."""

    box: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def result(self, timeout: float | None = None) -> Any:
        if "value" not in self.box:
            raise RuntimeError(f"task {self.id} has not run yet: it runs once the task that called it ends")
        return self.box["value"]

    async def aresult(self, timeout: float | None = None) -> Any:
        return self.result(timeout)


class _Eager:
    """Runs a registry's calls at once (see ``eager``)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._running = 0
        self._later: deque[Callable[[], Any]] = deque()
        self._dedup: dict[tuple[str, str], EagerHandle] = {}

    def _settings(self) -> Any:
        try:
            return self.registry.get_backend().settings
        except NotConfiguredError:
            return None

    def _prepare(self, fn: Any, args: Sequence[Any], kwargs: dict[str, Any], key: str | None, **options: Any) -> Any:
        """What the enqueue would check and store: the same refusals, then the task as a worker
        decodes it."""
        fn.check_call(args, kwargs)
        key = validate_key(str(key)) if key is not None else fn.key_of(args, kwargs)
        settings = self._settings()
        serializer = settings.serializer if settings is not None else JSONSerializer()
        limit = settings.max_payload_bytes if settings is not None else Settings.max_payload_bytes
        expires = options.get("expires_in") if options.get("expires_in") is not None else fn.expires_in
        record = TaskRecord(fn.name, list(args), dict(kwargs), key, {})
        when = due_spec(options.get("delay"), options.get("eta"))
        (task,) = encode_tasks([(new_task_id(), record)], serializer, expires, when, limit)
        seen = TaskRecord.decode(task.payload, serializer)
        stream = stream_name(fn.queue, key)
        ctx = TaskContext(task.id, fn.name, fn.queue, stream, key, 1, 1, 0, int(time.time() * 1000), 0, "eager")
        return ctx, seen, serializer

    def _handle(self, ctx: TaskContext, dedup_key: str | None) -> tuple[EagerHandle, bool]:
        """The call's handle, and whether it is new: a repeated dedup key gets the first's."""
        first = self._dedup.get((ctx.stream, dedup_key)) if dedup_key is not None else None
        if first is not None:
            return EagerHandle(first.id, first.queue, first.stream, first.name, duplicate=True, box=first.box), False
        handle = EagerHandle(ctx.id, ctx.queue, ctx.stream, ctx.name)
        if dedup_key is not None:
            self._dedup[(ctx.stream, dedup_key)] = handle
        return handle, True

    @staticmethod
    def _keep(fn: Any, handle: EagerHandle, value: Any, serializer: Serializer) -> None:
        handle.box["value"] = serializer.loads(serializer.dumps(value)) if fn.store_result else value

    def run(self, fn: Any, args: Sequence[Any], kwargs: dict[str, Any], key: str | None, **options: Any) -> EagerHandle:
        ctx, seen, serializer = self._prepare(fn, args, kwargs, key, **options)
        handle, new = self._handle(ctx, options.get("dedup_key"))
        if not new:
            return handle
        self._later.append(lambda: self._call(fn, ctx, seen, serializer, handle))
        if self._running:
            return handle  # called by a running task: it runs after that task, as on a worker
        # Every call enqueued so far runs, as on a worker, even after one failed; the first
        # failure is then raised to the caller.
        first: Exception | None = None
        while self._later:
            try:
                self._later.popleft()()
            except Exception as exc:
                first = first or exc
        if first is not None:
            raise first
        return handle

    def _call(self, fn: Any, ctx: TaskContext, seen: TaskRecord, serializer: Serializer, handle: EagerHandle) -> None:
        token = set_current(ctx)
        self._running += 1
        try:
            if inspect.iscoroutinefunction(fn.func):
                try:
                    asyncio.get_running_loop()
                except RuntimeError:
                    value = asyncio.run(fn.func(*seen.args, **seen.kwargs))
                else:
                    raise ConfigurationError(
                        f"eager mode cannot run the async task {fn.name} from inside a running event loop "
                        "with a blocking call: call it as 'await fn(...)' or 'await fn.aenqueue(...)'"
                    )
            else:
                value = fn.func(*seen.args, **seen.kwargs)
        finally:
            self._running -= 1
            reset_current(token)
        self._keep(fn, handle, value, serializer)

    async def arun(
        self, fn: Any, args: Sequence[Any], kwargs: dict[str, Any], key: str | None, **options: Any
    ) -> EagerHandle:
        if not inspect.iscoroutinefunction(fn.func):
            return self.run(fn, args, kwargs, key, **options)
        ctx, seen, serializer = self._prepare(fn, args, kwargs, key, **options)
        handle, new = self._handle(ctx, options.get("dedup_key"))
        if not new:
            return handle
        token = set_current(ctx)
        try:
            value = await fn.func(*seen.args, **seen.kwargs)
        finally:
            reset_current(token)
        self._keep(fn, handle, value, serializer)
        return handle


@contextlib.contextmanager
def eager(*, registry: Registry | None = None) -> Iterator[None]:
    """Within it, calling a ``@fifo`` function of ``registry`` (default: the registry of
    ``@pyfiq.fifo``) runs it at once, in the caller's thread and in call order, instead of
    enqueuing it: its arguments go through the serializer and back (what cannot be serialized
    fails as it would at an enqueue, and so does a task over ``max_payload_bytes`` or an
    ``expires_in`` that ends before a ``delay``), its key function runs, ``current_task()``
    answers, a repeated ``dedup_key`` returns the first call's handle without running, and its
    error is raised to the caller, without retries. A call made by a running task runs once that
    task has ended, as a worker would run it. ``delay``/``eta`` do not wait: the call runs at
    once. The call returns an ``EagerHandle`` whose ``result()`` is what the function returned.
    Nothing is sent to Redis, and no backend is needed. For behaviour that needs a worker (order
    across keys, retries, dead letters), use ``drain()``."""
    reg = default_registry if registry is None else registry
    previous, reg.eager = reg.eager, _Eager(reg)
    try:
        yield
    finally:
        reg.eager = previous

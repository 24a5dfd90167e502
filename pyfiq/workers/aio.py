"""The asyncio worker: the same core as the threaded one (``Scheduler``, ``StreamRun``,
``TaskRun``, the same scripts), driven by tasks in the application's own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from ..backend.backend import TRANSIENT, RedisQueueBackend, is_transient
from ..engine.keys import queue_of
from ..engine.lease import Lease, release_retry_delays
from ..engine.outcomes import Fenced, Outcome, Prepared, describe_error
from ..engine.protocol import Call, RateLimit, is_halt_notice
from ..engine.stream import Await, Finished, Pause, RunTask, StreamRun
from ..engine.task_run import TaskRun
from ..errors import AccessDeniedError
from ..functions import Registry, default_registry
from ..logs import log
from ..task import TaskContext, reset_current, set_current
from .base import WorkerBase
from .limits import await_with_limits, call_with_limits
from .reports import lease_ended, lease_started, report, report_kept


async def run_task_async(
    task: TaskRun,
    invoke: Callable[[TaskContext], Awaitable[Any]],
    sleep: Callable[[float], Awaitable[bool]],
    permit: Callable[[], Awaitable[bool]] | None = None,
) -> Outcome:
    """Run one task under its retry policy, awaiting it; ``sleep`` returns True when the wait
    was cut short by the lease's abort flag; ``permit`` and the events as in ``run_task_sync``."""
    while (ctx := task.begin()) is not None:
        if task.events:
            report(task.events.take())
        try:
            result = await invoke(ctx)
        except asyncio.CancelledError:
            task.cancelled()
            if task.events:
                report(task.events.take())
            raise  # the worker's own control flow, not the task's failure
        except BaseException as exc:
            decision = task.after_failure(exc)
            if task.events:
                report(task.events.take())
            if not isinstance(decision, float):
                return decision
            if await sleep(decision) or (permit is not None and not await permit()):
                break
            continue
        outcome = task.succeeded(result)
        if task.events:
            report(task.events.take())
        return outcome
    outcome = task.interrupted()
    if task.events:
        report(task.events.take())
    return outcome


def _background(call: Awaitable[Any]) -> asyncio.Future[Any]:
    """Run ``call`` as a task whose error is read even if nobody waits for it any more (a
    run that ended fenced or abandoned)."""
    future = asyncio.ensure_future(call)
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    return future


def _settled(future: asyncio.Future[Any]) -> Any:
    """A finished future's result, or the exception it ended with."""
    if future.cancelled():
        return asyncio.CancelledError()
    return future.exception() or future.result()


async def run_in_thread(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """``asyncio.to_thread``, except that cancellation waits for the thread: a function running
    in a thread cannot be stopped, and its stream's lease must stay held (renewed) until it
    really ends, or another replica would run the same task alongside it. The result is
    returned as usual, so a task that completes after a cancelled stop is still acknowledged."""
    loop = asyncio.get_running_loop()
    call = functools.partial(contextvars.copy_context().run, func, *args, **kwargs)
    future = loop.run_in_executor(None, call)
    while True:
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if future.cancelled():
                raise
            task = asyncio.current_task()
            uncancel = getattr(task, "uncancel", None)  # Python 3.11+
            if uncancel is not None:
                uncancel()


class AsyncWorker(WorkerBase):
    """Consumes pyfiq queues in the running event loop (FastAPI lifespan, ``async with``).

    ``async def`` tasks are awaited on this loop; plain functions run in the default thread
    pool so they never block it. A graceful ``stop()`` cancels nothing until its deadline;
    past it, running tasks are cancelled and stay in Redis for redelivery. ``registry``,
    ``queues`` and ``backend`` default as for ``ThreadedWorker``.
    """

    def __init__(
        self,
        backend: RedisQueueBackend | None = None,
        *,
        registry: Registry | None = None,
        queues: Iterable[str] | None = None,
        concurrency: int = 16,
        replica: str | None = None,
    ) -> None:
        # One event loop runs the scheduler and every lease's halts and first attempts: no locks.
        self._setup(backend, registry, queues, concurrency, replica, "asyncio", contextlib.nullcontext)
        self._work: asyncio.Queue[Lease | None] = asyncio.Queue()
        self._nudge = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        # Set to renew now: an operator's pause or skip asks holders to hear of it at once.
        self._beat_now = asyncio.Event()
        self._abandoned = asyncio.Event()
        self._executors: list[asyncio.Task[None]] = []
        self._control: list[asyncio.Task[None]] = []
        self._dispatcher: asyncio.Task[None] | None = None
        self._finisher: asyncio.Task[None] | None = None
        self._started = False
        #: Why the worker went down on its own (a task of it died), if it did.
        self.failure: BaseException | None = None
        self.log = log.bind(replica=self.replica)

    async def start(self) -> AsyncWorker:
        if self._started:
            return self
        self._started = True
        try:
            await self.backend.acheck_layout()
        except TRANSIENT as exc:  # Redis not reachable yet: the dispatcher checks before claiming
            self.log.warning("pyfiq.redis_unreachable_at_start", error=describe_error(exc))
        self._executors = [self._spawn(self._executor(), f"pyfiq-exec-{i}") for i in range(self.concurrency)]
        self._dispatcher = self._spawn(self._dispatch(), "pyfiq-dispatch")
        self._control = [
            self._spawn(self._heartbeat(), "pyfiq-heartbeat"),
            self._spawn(self._listen(), "pyfiq-wake"),
            self._spawn(self._tick(), "pyfiq-ticks"),
            self._dispatcher,
        ]
        self.log.info("pyfiq.worker_started", **self.started_fields("asyncio"))
        return self

    def _spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[None]) -> None:
        """A task of this worker ended. Before a stop that is a failure: never leave a worker
        that looks alive and consumes nothing; stop it, loudly."""
        if task.cancelled() or self._stopping.is_set():
            return
        exc = task.exception() or RuntimeError(f"{task.get_name()} ended unexpectedly")
        if self.failure is None:
            self.failure = exc
        with contextlib.suppress(BaseException):  # logging may be what failed
            self.log.critical("pyfiq.worker_task_died", task=task.get_name(), error=describe_error(exc), exc_info=exc)
        self._finisher = asyncio.ensure_future(self._stop_after_failure())

    def abandon(self) -> None:
        """Stop as if the process had died: no acknowledgement, no release, no more heartbeats.
        Leases lapse after their TTL. For demos and failure tests."""
        self._abandoned.set()
        self._stopping.set()
        self._stopped.set()
        self.scheduler.dispatching = False
        self._beat_now.set()
        self._nudge.set()
        self.scheduler.abort_all()
        for _ in self._executors:
            self._work.put_nowait(None)

    async def _stop_after_failure(self) -> None:
        await self.stop()

    @property
    def healthy(self) -> bool:
        """True while the worker runs as it should: started, not stopping, no task of it died."""
        return (
            self._started
            and self.failure is None
            and not self._stopping.is_set()
            and not any(t.done() for t in (*self._executors, *self._control))
        )

    async def stop(self, timeout: float = 30.0) -> bool:
        """Finish running tasks, release every lease and return; idempotent.

        Returns False if tasks were still running at ``timeout``. ``async def`` tasks are then
        cancelled (they stay in Redis for redelivery). A plain function running in a thread
        cannot be cancelled: its lease stays renewed until it really ends, then its stream is
        handed over (acknowledged first if it succeeded), in the background of this loop. If
        the loop or the process ends first, the lease lapses after ``lease_ttl`` and the next
        holder runs the task again: two live runs of one task never overlap."""
        if not self._started:
            self._stopped.set()
            return True
        if self._stopping.is_set():
            if self._finisher is not None and self._finisher is not asyncio.current_task():
                await asyncio.wait([self._finisher], timeout=max(0.0, timeout))
            return self._stopped.is_set()
        deadline = time.monotonic() + timeout
        self._stopping.set()
        self.scheduler.dispatching = False
        self._beat_now.set()  # tell the fleet at once that this replica polls no shard
        self._nudge.set()
        # The dispatcher first, so a lease being acquired reaches an executor that releases it.
        assert self._dispatcher is not None
        await asyncio.wait([self._dispatcher], timeout=max(0.0, deadline - time.monotonic()))
        self.scheduler.abort_all()
        for _ in self._executors:
            self._work.put_nowait(None)
        _, pending = await asyncio.wait(self._executors, timeout=max(0.01, deadline - time.monotonic()))
        for t in pending:
            t.cancel()
        if pending:
            # Cancelled coroutines release their streams; tasks in threads run on.
            await asyncio.wait(pending, timeout=1.0)
        running = [t for t in self._executors if not t.done()]
        if running:
            self.log.warning(
                "pyfiq.worker_stop_timed_out",
                left_running=self.running_tasks(),
                then="their leases lapse and other replicas run them again",
            )
            if self._finisher is None or self._finisher.done():
                self._finisher = asyncio.ensure_future(self._finish(running))
            return False
        await self._shut_down()
        return not pending

    async def _finish(self, running: list[asyncio.Task[None]]) -> None:
        await asyncio.wait(running)
        await self._shut_down()

    async def _shut_down(self) -> None:
        # Heartbeats last: leases stay renewed while running tasks finish.
        self._stopped.set()
        for t in self._control:
            t.cancel()
        await asyncio.gather(*self._control, return_exceptions=True)
        self.log.info("pyfiq.worker_stopped")

    async def join(self, timeout: float | None = None) -> bool:
        """Wait until the worker has stopped (``stop()`` or a failure); False if ``timeout``
        passed first."""
        if timeout is None:
            await self._stopped.wait()
            return True
        return await _wait(self._stopped, timeout)

    async def run_forever(self) -> None:
        """Start (if needed) and wait until the worker stops."""
        await self.start()
        await self.join()

    async def __aenter__(self) -> AsyncWorker:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _dispatch(self) -> None:
        while not self._stopping.is_set():
            self._nudge.clear()
            try:
                await self._claim()
            except AccessDeniedError:
                raise  # no wait fixes a password or an ACL: the worker goes down, loudly
            except Exception as exc:
                backoff = self.scheduler.claim_failed(exc)
                report_kept(self.scheduler.events)
                await _wait(self._nudge, backoff)
                continue
            self.scheduler.claim_succeeded()
            wait = self.scheduler.idle_wait(self.clock.monotonic())
            if wait > 0:
                await _wait(self._nudge, wait)

    async def _claim(self) -> None:
        await self.backend.acheck_layout()  # once: refuses a deployment with another shard count
        now = self.clock.monotonic()
        shards, calls = self.scheduler.due_calls(now)
        if not calls:
            return
        try:
            await self._acquire(self.scheduler.candidates(shards, await self.backend.acall_many(calls), now))
        except Exception:
            self.scheduler.wake(shards)  # the retry looks at them again: no wake-up is lost with it
            raise

    async def _acquire(self, candidates: list[tuple[int, str]]) -> None:
        report_kept(self.scheduler.events)
        for i, (shard, stream) in enumerate(candidates):
            if self.scheduler.free() <= 0 or self._stopping.is_set():
                self.scheduler.unclaimed(candidates[i:])
                break
            sent = self.clock.monotonic()
            reply = await self.backend.acall(self.ops.acquire(stream, self.scheduler.first_take(stream), self.replica))
            lease = self.scheduler.on_acquired(shard, stream, reply, asyncio.Event(), sent)
            if lease is not None:
                self.log.debug("pyfiq.lease_acquired", stream=stream, fencing_token=lease.fence)
                lease_started(lease)
                self._work.put_nowait(lease)

    async def _listen(self) -> None:
        while not self._stopped.is_set():
            pubsub = self.backend.async_wake_listener()
            try:
                await pubsub.subscribe()
                self.scheduler.wake_all()
                self._nudge.set()
                while not self._stopped.is_set():
                    message = await pubsub.get_message(timeout=0.5)
                    if message and message.get("type") == "message":
                        if is_halt_notice(message["data"]):  # an operator acted: renew now
                            self._beat_now.set()
                        else:
                            self.scheduler.wake([int(message["data"])])
                            self._nudge.set()
            except Exception as exc:
                self.log.debug("pyfiq.wake_listener_reconnecting", error=describe_error(exc))
                await _wait(self._stopped, min(1.0, self.settings.poll_interval))
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _tick(self) -> None:
        ticks = self.ticks
        while not self._stopping.is_set():
            advances = ticks.due(self.clock.monotonic())
            if not advances:
                await _wait(self._stopping, ticks.wait(self.clock.monotonic()))
                continue
            try:
                replies: list[Any] = await self.backend.acall_many([self.ops.tick(a, self.replica) for a in advances])
            except Exception as exc:
                replies = [exc] * len(advances)
            ticks.apply(advances, replies, self.clock.monotonic())

    async def _heartbeat(self) -> None:
        while True:
            await _wait(self._beat_now, self.scheduler.heartbeat_wait(self.clock.monotonic()))
            self._beat_now.clear()
            if self._abandoned.is_set() or self._stopped.is_set():
                break
            now = self.clock.monotonic()
            leases, calls = self.scheduler.heartbeat_round(now)
            if not calls:
                report_kept(self.scheduler.events)
                continue
            try:
                replies: list[Any] = await self.backend.acall_many(calls)
            except Exception as exc:
                replies = [exc] * len(calls)
            self.scheduler.on_renewed(leases, replies, now)
            report_kept(self.scheduler.events)
            if followups := self.scheduler.followups():
                try:
                    answers: list[Any] = await self.backend.acall_many([call for _, _, call in followups])
                except Exception as exc:
                    answers = [exc] * len(followups)
                self.scheduler.on_followups(followups, answers)
                self._nudge.set()  # a let-go makes the stream claimable, here too
            if self.scheduler.gained_shards():
                self._nudge.set()

    async def _executor(self) -> None:
        while (lease := await self._work.get()) is not None:
            run = self._stream_run(lease, self._stopping.is_set, self._abandoned.is_set)
            try:
                await self._run_stream(run)
            finally:
                self.scheduler.finished(lease, run)
                self._nudge.set()
                if not self._abandoned.is_set():  # a dead process reports nothing either
                    lease_ended(lease)

    async def _run_stream(self, run: StreamRun) -> None:
        lease = run.lease
        sent: deque[asyncio.Future[Any]] = deque()
        in_order = asyncio.Lock()  # fair: background calls go in the order they were made
        try:
            step = run.start()
            while not isinstance(step, Finished):
                if isinstance(step, RunTask):
                    if step.send is not None:
                        sent.append(_background(self._send_in_order(in_order, step.send)))
                    outcome = await self._execute(lease, step)
                    while sent and sent[0].done():
                        run.collect(_settled(sent.popleft()))
                    step = run.feed(outcome)
                elif isinstance(step, Await):
                    # asyncio.wait never cancels what it waits for: a cancelled stop lets the
                    # call land rather than cut it mid-reply (and leaves no unread error behind).
                    await asyncio.wait([sent[0]])
                    step = run.feed(_settled(sent.popleft()))
                elif isinstance(step, Pause):
                    await _wait(lease.abort, step.seconds)  # type: ignore[arg-type]
                    step = run.feed(None)
                else:
                    step = run.feed(await self.backend.acall(step))
                if run.events:
                    report(run.events.take())
                if run.broken is not None:
                    raise run.broken
        except BaseException as exc:
            level = "warning" if is_transient(exc) or isinstance(exc, asyncio.CancelledError) else "error"
            getattr(self.log, level)("pyfiq.stream_failed", stream=lease.stream, error=describe_error(exc))
            call = run.fail()
            if call is not None and not self._abandoned.is_set():
                # Shielded: a cancelled stop still hands the stream over; retried because Redis
                # may be back in a moment, and a repeated release is refused, not doubled.
                for delay in release_retry_delays(self.settings.lease_ttl):
                    try:
                        await asyncio.sleep(delay)
                        await asyncio.shield(self.backend.acall(call))
                        break
                    except asyncio.CancelledError:
                        break
                    except Exception:
                        continue
                else:
                    lease.mark_lost("release failed after an error; the lease will lapse")
            if not isinstance(exc, Exception):
                raise
            return
        self.scheduler.ended(run, step)
        report_kept(self.scheduler.events)

    async def _send_in_order(self, lock: asyncio.Lock, call: Call) -> Any:
        async with lock:
            return await self.backend.acall(call)

    async def _execute(self, lease: Lease, step: RunTask) -> Outcome:
        prepared = self.scheduler.prepare(lease, step, self.replica)
        report_kept(self.scheduler.events)
        if not isinstance(prepared, Prepared):
            return prepared
        if self._abandoned.is_set():
            return Fenced()
        func, record = prepared.func.func, prepared.record
        abort: asyncio.Event = lease.abort  # type: ignore[assignment]
        task = TaskRun(prepared, lease, self.clock, max_wait=self.max_retry_wait)

        async def invoke(ctx: TaskContext) -> Any:
            token = set_current(ctx)
            try:
                if inspect.iscoroutinefunction(func):
                    return await await_with_limits(task, func(*record.args, **record.kwargs))
                # The context is copied into the thread, so current_task() works there.
                return await run_in_thread(call_with_limits, task, func, *record.args, **record.kwargs)
            finally:
                reset_current(token)

        limit = self.scheduler.tasks.rate_limit_of(queue_of(lease.stream))
        permit = None if limit is None else (lambda: self._wait_permit(lease, limit))
        return await run_task_async(task, invoke, lambda s: _wait(abort, s), permit)

    async def _wait_permit(self, lease: Lease, limit: RateLimit) -> bool:
        call = self.ops.rate(queue_of(lease.stream), limit)
        while (wait_ms := int(await self.backend.acall(call))) > 0:
            if await _wait(lease.abort, wait_ms / 1000):  # type: ignore[arg-type]
                return False
        return True


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    """Wait for ``event`` at most ``timeout`` seconds; True if it is set."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)
    return event.is_set()


async def async_worker(
    backend: RedisQueueBackend | None = None,
    *,
    registry: Registry | None = None,
    queues: Iterable[str] | None = None,
    concurrency: int = 16,
    replica: str | None = None,
) -> AsyncWorker:
    """Start an [`AsyncWorker`][pyfiq.AsyncWorker] in the running loop and make ``backend`` the backend of its
    registry's functions (the default registry's unless ``registry`` is given)."""
    if backend is not None:
        (default_registry if registry is None else registry).configure(backend)
    worker = AsyncWorker(backend, registry=registry, queues=queues, concurrency=concurrency, replica=replica)
    return await worker.start()

"""The threaded worker: a dispatcher, a heartbeat, a wake-up listener and N executor threads
driving the shared core (``Scheduler``, ``StreamRun``, ``TaskRun``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import inspect
import queue as queue_mod
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from ..backend.backend import TRANSIENT, RedisQueueBackend, is_transient
from ..engine.keys import queue_of
from ..engine.lease import Lease, release_retry_delays
from ..engine.outcomes import Fenced, Outcome, Prepared, describe_error
from ..engine.protocol import RateLimit, is_halt_notice
from ..engine.stream import Await, Finished, Pause, RunTask, StreamRun
from ..engine.task_run import TaskRun
from ..errors import AccessDeniedError, ConfigurationError
from ..functions import Registry, default_registry
from ..logs import log
from ..task import TaskContext, reset_current, set_current
from .base import WorkerBase
from .limits import await_with_limits, call_with_limits
from .reports import lease_ended, lease_started, report, report_kept
from .sends import send_in_order, settled


def run_task_sync(
    task: TaskRun,
    invoke: Callable[[TaskContext], Any],
    sleep: Callable[[float], Any],
    permit: Callable[[], bool] | None = None,
) -> Outcome:
    """Run one task under its retry policy in this thread; ``sleep`` returns True when the
    wait was cut short by the lease's abort flag. ``permit`` (rate-limited queues) waits for
    the queue's permit before every retry, False if aborted: retries hit the same downstream.
    The task's events are reported after each of its steps, before the next one."""
    while (ctx := task.begin()) is not None:
        if task.events:
            report(task.events.take())
        try:
            result = invoke(ctx)
        except BaseException as exc:
            decision = task.after_failure(exc)
            if task.events:
                report(task.events.take())
            if not isinstance(decision, float):
                return decision
            if sleep(decision) or (permit is not None and not permit()):
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


class ThreadedWorker(WorkerBase):
    """Consumes pyfiq queues in background threads of this process.

    ``registry``: whose tasks it runs (default: the registry of ``@pyfiq.fifo``); a task of any
    other registry is unknown to it. ``queues``: the queues to consume; by default every queue
    named by a function of that registry, including ones defined after the worker started.
    ``backend``: by default the registry's (``configure``). ``concurrency``: how many
    streams run at once, whatever the number of queues. ``async def`` tasks run on an event
    loop the worker owns. Signal handlers are installed only with
    ``install_signal_handlers=True`` (from the main thread): the first SIGINT/SIGTERM stops
    gracefully, a second one is left to the previous handler.
    """

    def __init__(
        self,
        backend: RedisQueueBackend | None = None,
        *,
        registry: Registry | None = None,
        queues: Iterable[str] | None = None,
        concurrency: int = 4,
        install_signal_handlers: bool = False,
        replica: str | None = None,
    ) -> None:
        # The scheduler and every lease's gate: touched by several threads at once, real locks.
        self._setup(backend, registry, queues, concurrency, replica, "threaded", threading.Lock)
        self._install_signals = install_signal_handlers
        self._work: queue_mod.Queue[Lease | None] = queue_mod.Queue()
        self._nudge = threading.Event()
        # Held by whoever looks and claims: the dispatcher, or the listener on a wake-up.
        self._claiming = threading.Lock()
        self._stopping = threading.Event()
        self._abandoned = threading.Event()
        self._stopped = threading.Event()
        # Set to renew now: an operator's pause or skip asks holders to hear of it at once.
        self._beat_now = threading.Event()
        self._threads: list[threading.Thread] = []
        self._control: list[threading.Thread] = []
        self._dispatcher: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
        self._started = False
        self._stop_lock = threading.Lock()
        #: Why the worker went down on its own (a thread of it died), if it did.
        self.failure: BaseException | None = None
        self.log = log.bind(replica=self.replica)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> ThreadedWorker:
        """Start the worker's threads; again on a started worker, nothing. A worker built
        before a fork may be started in the child (a pre-fork server's post-fork hook), where
        it takes a replica id of its own; one already started before the fork cannot."""
        if not self._adopt_process(self._started):
            raise ConfigurationError(
                f"worker {self.replica} was started in process {self._pid} before this process"
                " forked from it; its threads and leases stayed there: start a new worker here"
                " (in a pre-fork server, start workers after the fork, e.g. in gunicorn's"
                " post_worker_init hook)"
            )
        if self._started:
            return self
        try:
            self.backend.check_layout()
        except TRANSIENT as exc:  # Redis not reachable yet: the dispatcher checks before claiming
            self.log.warning("pyfiq.redis_unreachable_at_start", error=describe_error(exc))
        self._started = True
        for i in range(self.concurrency):
            self._threads.append(self._spawn(self._executor, f"pyfiq-exec-{i}"))
        self._control.append(self._spawn(self._heartbeat, "pyfiq-heartbeat"))
        self._control.append(self._spawn(self._listen, "pyfiq-wake"))
        self._control.append(self._spawn(self._tick, "pyfiq-ticks"))
        self._dispatcher = self._spawn(self._dispatch, "pyfiq-dispatch")
        self._control.append(self._dispatcher)
        if self._install_signals:
            self._install_signal_handlers()
        self.log.info("pyfiq.worker_started", **self.started_fields("threaded"))
        return self

    def _spawn(self, target: Callable[[], None], name: str) -> threading.Thread:
        def supervised() -> None:
            try:
                target()
            except BaseException as exc:
                self._crashed(name, exc)

        t = threading.Thread(target=supervised, name=name, daemon=True)
        t.start()
        return t

    def _crashed(self, name: str, exc: BaseException) -> None:
        """A thread of this worker died of something other than stop: never leave a replica
        that looks alive and consumes nothing. Stop the whole worker, loudly."""
        if self.failure is None:
            self.failure = exc
        with contextlib.suppress(BaseException):  # logging may be what failed
            self.log.critical("pyfiq.worker_thread_died", thread=name, error=describe_error(exc), exc_info=exc)
        if not self._stopping.is_set():
            threading.Thread(target=self.stop, name="pyfiq-stop", daemon=True).start()

    @property
    def healthy(self) -> bool:
        """True while the worker runs as it should: started, not stopping, no thread of it
        died. For health checks (a liveness probe can restart a replica that is not)."""
        alive = all(t.is_alive() for t in (*self._threads, *self._control))
        return self._started and self.failure is None and not self._stopping.is_set() and alive

    def _busy(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def stop(self, timeout: float = 30.0) -> bool:
        """Finish running tasks, release every lease (hand-off) and return. Idempotent.

        Returns False if a task was still running at ``timeout``. A running function cannot be
        stopped from outside, so its lease is *not* given up: heartbeats go on until the task
        really ends, and then its stream is handed over (acknowledged first if it succeeded).
        If the process exits before that, the lease lapses after ``lease_ttl`` and the next
        holder runs the task again: at no point do two live runs of one task overlap.
        """
        if not self._adopt_process(self._started):
            # The worker of the parent process: stopping it is the parent's to do.
            return True
        with self._stop_lock:
            if self._stopped.is_set() or not self._started:
                self._stopped.set()
                return not self._busy()
            deadline = time.monotonic() + timeout
            self._stopping.set()
            self.scheduler.dispatching = False
            self._beat_now.set()  # tell the fleet at once that this replica polls no shard
            self._nudge.set()
            # The dispatcher first, then a claim of the listener's (until the deadline: Redis may
            # hang): a lease being acquired must reach an executor (which releases it) before the
            # executors are told to exit. None while start() names it (a dispatcher died at once).
            if self._dispatcher is not None:
                self._dispatcher.join(max(0.0, deadline - time.monotonic()))
            self.scheduler.abort_all()  # end retry back-offs; running attempts finish
            claiming = self._claiming.acquire(timeout=max(0.0, deadline - time.monotonic()))
            for _ in self._threads:
                self._work.put(None)
            if claiming:
                self._claiming.release()
            clean = True
            # Executors before heartbeats: leases stay renewed while running tasks finish.
            for t in self._threads:
                t.join(max(0.0, deadline - time.monotonic()))
                clean = clean and not t.is_alive()
            self._stopped.set()
            self._beat_now.set()
            for t in self._control:
                t.join(max(0.0, min(2.0, deadline - time.monotonic())))
            if clean:
                self._stop_loop()
            else:
                self.log.warning(
                    "pyfiq.worker_stop_timed_out",
                    left_running=self.running_tasks(),
                    then="their leases lapse and other replicas run them again",
                )
            self.log.info("pyfiq.worker_stopped", clean=clean)
            return clean

    def _stop_loop(self) -> None:
        # Only once no executor waits on it: stopping the loop under a running async task would
        # freeze that task and keep its lease renewed forever.
        with self._loop_lock:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._loop.stop)

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
        for _ in self._threads:
            self._work.put(None)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the worker has stopped (``stop()``, a signal, or a failure); False if
        ``timeout`` passed first."""
        return self._stopped.wait(timeout)

    def run_forever(self) -> None:
        """Start (if needed) and block until the worker stops: for scripts that only run a
        worker. With ``install_signal_handlers=True`` a SIGINT/SIGTERM ends it gracefully."""
        self.start()
        while not self.join(1.0):
            pass

    def __enter__(self) -> ThreadedWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise ConfigurationError("install_signal_handlers=True needs the main thread")

        def handler(signum: int, frame: FrameType | None) -> None:
            self.log.info("pyfiq.signal_received", signal=signal.Signals(signum).name)
            for sig, old in previous.items():
                signal.signal(sig, old)
            threading.Thread(target=self.stop, name="pyfiq-stop", daemon=True).start()

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    # -- threads ------------------------------------------------------------------------

    def _dispatch(self) -> None:
        while not self._stopping.is_set():
            self._nudge.clear()
            try:
                with self._claiming:
                    self._claim()
            except AccessDeniedError:
                raise  # no wait fixes a password or an ACL: the worker goes down, loudly
            except Exception as exc:
                backoff = self.scheduler.claim_failed(exc)
                report_kept(self.scheduler.events)
                self._nudge.wait(backoff)
                continue
            self.scheduler.claim_succeeded()
            wait = self.scheduler.idle_wait(self.clock.monotonic())
            if wait > 0:
                self._nudge.wait(wait)

    def _claim(self) -> None:
        self.backend.check_layout()  # once: refuses a deployment with another shard count
        now = self.clock.monotonic()
        shards, calls = self.scheduler.due_calls(now)
        if not calls:
            return
        try:
            self._acquire(self.scheduler.candidates(shards, self.backend.call_many(calls), now))
        except Exception:
            self.scheduler.wake(shards)  # the retry looks at them again: no wake-up is lost with it
            raise

    def _acquire(self, candidates: list[tuple[int, str]]) -> None:
        report_kept(self.scheduler.events)
        for i, (shard, stream) in enumerate(candidates):
            if self.scheduler.free() <= 0 or self._stopping.is_set():
                self.scheduler.unclaimed(candidates[i:])
                break
            sent = self.clock.monotonic()
            reply = self.backend.call(self.ops.acquire(stream, self.scheduler.first_take(stream), self.replica))
            lease = self.scheduler.on_acquired(shard, stream, reply, threading.Event(), sent)
            if lease is not None:
                self.log.debug("pyfiq.lease_acquired", stream=stream, fencing_token=lease.fence)
                lease_started(lease)
                self._work.put(lease)

    def _claim_woken(self) -> None:
        """Claimed by the listener at once (a thread hop less), else or on failure by the dispatcher."""
        if not self._claiming.acquire(blocking=False):
            self._nudge.set()
            return
        try:
            if not self._stopping.is_set():  # read under the lock stop() takes
                self._claim()
        except Exception:
            self._nudge.set()
        finally:
            self._claiming.release()

    def _listen(self) -> None:
        pubsub = None
        while not self._stopped.is_set():
            try:
                if pubsub is None:
                    pubsub = self.backend.wake_listener()
                    # Anything published while we were not subscribed is found by a look now.
                    self.scheduler.wake_all()
                    self._nudge.set()
                message = pubsub.get_message(timeout=0.5)
                if message and message.get("type") == "message":
                    data = message["data"]
                    if is_halt_notice(data):  # an operator acted on a stream: renew (and hear it) now
                        self._beat_now.set()
                    else:
                        self.scheduler.wake([int(data)])
                        self._claim_woken()
            except Exception as exc:
                self.log.debug("pyfiq.wake_listener_reconnecting", error=describe_error(exc))
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()
                pubsub = None
                self._stopped.wait(min(1.0, self.settings.poll_interval))
        if pubsub is not None:
            with contextlib.suppress(Exception):
                pubsub.close()

    def _tick(self) -> None:
        ticks = self.ticks
        while not self._stopping.is_set():
            advances = ticks.due(self.clock.monotonic())
            if not advances:
                self._stopping.wait(ticks.wait(self.clock.monotonic()))
                continue
            try:
                replies: list[Any] = self.backend.call_many([self.ops.tick(a, self.replica) for a in advances])
            except Exception as exc:
                replies = [exc] * len(advances)
            ticks.apply(advances, replies, self.clock.monotonic())

    def _heartbeat(self) -> None:
        while True:
            self._beat_now.wait(self.scheduler.heartbeat_wait(self.clock.monotonic()))
            self._beat_now.clear()
            # Past a stop, heartbeats go on while a task still runs: its lease must not lapse
            # under a live execution (another replica would run the same task meanwhile).
            if self._abandoned.is_set() or (self._stopped.is_set() and not self._busy()):
                break
            now = self.clock.monotonic()
            leases, calls = self.scheduler.heartbeat_round(now)
            if not calls:
                report_kept(self.scheduler.events)
                continue
            try:
                replies: list[Any] = self.backend.call_many(calls)
            except Exception as exc:
                replies = [exc] * len(calls)
            self.scheduler.on_renewed(leases, replies, now)
            report_kept(self.scheduler.events)
            if followups := self.scheduler.followups():
                try:
                    answers: list[Any] = self.backend.call_many([call for _, _, call in followups])
                except Exception as exc:
                    answers = [exc] * len(followups)
                self.scheduler.on_followups(followups, answers)
                self._nudge.set()  # a let-go makes the stream claimable, here too
            if self.scheduler.gained_shards():
                self._nudge.set()
        if self._stopped.is_set() and not self._abandoned.is_set():
            self._stop_loop()

    def _executor(self) -> None:
        # Sends this executor's group takes while it runs tasks, in order, never side by side.
        sender = concurrent.futures.ThreadPoolExecutor(1, "pyfiq-send")
        # Its own connection: a pooled one costs a checkout and a return on every call.
        connection = self.backend.own_connection()
        try:
            while (lease := self._work.get()) is not None:
                run = None
                try:
                    run = self._run_stream(lease, sender, connection)
                finally:
                    self.scheduler.finished(lease, run)
                    self._nudge.set()
                    if not self._abandoned.is_set():  # a dead process reports nothing either
                        lease_ended(lease)
        finally:
            sender.shutdown(wait=False)
            if connection is not None:
                connection.disconnect()

    def _run_stream(self, lease: Lease, sender: concurrent.futures.ThreadPoolExecutor, connection: Any) -> StreamRun:
        run = self._stream_run(lease, self._stopping.is_set, self._abandoned.is_set)
        sent: deque[concurrent.futures.Future[Any]] = deque()
        try:
            step = run.start()
            while not isinstance(step, Finished):
                if isinstance(step, RunTask):
                    if step.send is not None:
                        sent.append(send_in_order(sender, sent, self.backend.call, step.send))
                    outcome = self._execute(lease, step)
                    while sent and sent[0].done():
                        run.collect(settled(sent.popleft()))
                    step = run.feed(outcome)
                elif isinstance(step, Await):
                    step = run.feed(settled(sent.popleft()))
                elif isinstance(step, Pause):
                    lease.abort.wait(step.seconds)  # type: ignore[attr-defined]
                    step = run.feed(None)
                else:
                    step = run.feed(self.backend.call(step, connection=connection))
                if run.events:
                    report(run.events.take())
                if run.broken is not None:
                    raise run.broken
        except BaseException as exc:
            level = "warning" if is_transient(exc) else "error"
            getattr(self.log, level)("pyfiq.stream_failed", stream=lease.stream, error=describe_error(exc))
            call = run.fail()
            if call is not None and not self._abandoned.is_set():
                # Redis may be back in a moment (a restart): hand over now rather than let
                # the stream wait out the lease TTL. A repeated release is refused, not doubled.
                for delay in release_retry_delays(self.settings.lease_ttl):
                    time.sleep(delay)
                    try:
                        self.backend.call(call)
                        break
                    except Exception:
                        continue
                else:
                    lease.mark_lost("release failed after an error; the lease will lapse")
            if not isinstance(exc, Exception):
                raise
            return run
        self.scheduler.ended(run, step)
        report_kept(self.scheduler.events)
        return run

    def _execute(self, lease: Lease, step: RunTask) -> Outcome:
        prepared = self.scheduler.prepare(lease, step, self.replica)
        report_kept(self.scheduler.events)
        if not isinstance(prepared, Prepared):
            return prepared
        if self._abandoned.is_set():
            return Fenced()
        func, record = prepared.func.func, prepared.record
        abort: threading.Event = lease.abort  # type: ignore[assignment]
        task = TaskRun(prepared, lease, self.clock, max_wait=self.max_retry_wait)

        def invoke(ctx: TaskContext) -> Any:
            token = set_current(ctx)
            try:
                if inspect.iscoroutinefunction(func):
                    coro = _in_context(contextvars.copy_context(), task, func, record)
                    return asyncio.run_coroutine_threadsafe(coro, self._event_loop()).result()
                return call_with_limits(task, func, *record.args, **record.kwargs)
            finally:
                reset_current(token)

        limit = self.scheduler.tasks.rate_limit_of(queue_of(lease.stream))
        permit = None if limit is None else (lambda: self._wait_permit(lease, limit))
        return run_task_sync(task, invoke, abort.wait, permit)

    def _wait_permit(self, lease: Lease, limit: RateLimit) -> bool:
        call = self.ops.rate(queue_of(lease.stream), limit)
        while (wait_ms := int(self.backend.call(call))) > 0:
            if lease.abort.wait(wait_ms / 1000):  # type: ignore[attr-defined]
                return False
        return True

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """The loop ``async def`` tasks run on: started on first use, in its own thread."""
        with self._loop_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                self._spawn(loop.run_forever, "pyfiq-loop")
                self._loop = loop
            return self._loop


async def _in_context(context: contextvars.Context, task: TaskRun, func: Any, record: Any) -> Any:
    # The coroutine runs on the loop's thread, in a context of its own: it gets the worker
    # thread's (current_task(), a tracer's current span) copied in, as a thread would.
    for var, value in context.items():
        var.set(value)
    return await await_with_limits(task, func(*record.args, **record.kwargs))


def threaded_worker(
    backend: RedisQueueBackend | None = None,
    *,
    registry: Registry | None = None,
    queues: Iterable[str] | None = None,
    concurrency: int = 4,
    install_signal_handlers: bool = False,
    replica: str | None = None,
) -> ThreadedWorker:
    """Start a [`ThreadedWorker`][pyfiq.ThreadedWorker] and make ``backend`` the backend of its registry's functions
    (the default registry's unless ``registry`` is given)."""
    if backend is not None:
        (default_registry if registry is None else registry).configure(backend)
    return ThreadedWorker(
        backend,
        registry=registry,
        queues=queues,
        concurrency=concurrency,
        install_signal_handlers=install_signal_handlers,
        replica=replica,
    ).start()

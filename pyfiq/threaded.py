"""The threaded worker: dispatcher, heartbeat, wake-up listener and N executor threads
driving the shared core (``core.StreamRun``)."""

from __future__ import annotations

import contextlib
import queue as queue_mod
import random
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import replace
from types import FrameType
from typing import Any

import structlog
from tenacity import RetryCallState, Retrying, stop_when_event_set

from . import registry
from .backend import TRANSIENT, RedisQueueBackend
from .core import (
    Aborted,
    Acked,
    DeadLettered,
    Deferred,
    Fenced,
    Finished,
    Lease,
    Outcome,
    Prepared,
    RunTask,
    StreamRun,
    dead_letter_header,
    prepare,
    replica_id,
)
from .errors import ConfigurationError
from .keys import validate_queue_name
from .task import TaskContext, reset_current, set_current

log = structlog.get_logger("pyfiq")


class _Interrupted(BaseException):
    """Raised inside a retry loop when the lease was lost or the worker stops; a
    BaseException so no retry predicate ever retries it."""


class TaskExit(Exception):
    """A task raised SystemExit or another BaseException: recorded as its failure."""


#: Pause between exhausted rounds of an ``on_exhausted="block"`` task whose policy has no wait.
BLOCK_MIN_PAUSE = 0.1


def call_hook(hook: Any, *args: Any, event: str, ctx: TaskContext) -> None:
    if hook is None:
        return
    try:
        hook(*args)
    except Exception:
        log.exception("pyfiq.callback_failed", callback=event, task_id=ctx.id, queue=ctx.queue)


def run_sync_task(prepared: Prepared, lease: Lease, sleep: Any) -> Outcome:
    """Run one task under its retry policy, in this thread."""
    fn, record, ctx = prepared.func, prepared.record, prepared.context
    logger = log.bind(
        queue=ctx.queue,
        stream=ctx.stream,
        task_id=ctx.id,
        task=ctx.name,
        deliveries=ctx.deliveries,
        fencing_token=ctx.fencing_token,
    )
    attempts = 0
    policy = fn.policy
    state: RetryCallState | None = None

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        logger.warning("pyfiq.task_retry_scheduled", attempt=attempts, wait=wait, error=repr(exc))

    while True:
        retrying = Retrying(
            stop=policy.stop | stop_when_event_set(lease.abort),  # type: ignore[arg-type]
            wait=policy.wait,
            retry=policy.retry,
            sleep=sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            for attempt in retrying:
                state = attempt.retry_state
                with attempt:
                    if lease.abort.is_set():
                        raise _Interrupted
                    attempts += 1
                    ctx = replace(ctx, attempt=attempts)
                    token = set_current(ctx)
                    try:
                        result = fn.func(*record.args, **record.kwargs)
                    except _Interrupted:
                        raise
                    except BaseException as exc:
                        # SystemExit and friends from a task are the task's failure; they
                        # must not end this worker thread.
                        call_hook(fn.on_error, exc, ctx, fn, event="on_error", ctx=ctx)
                        if not isinstance(exc, Exception):
                            raise TaskExit(repr(exc)) from exc
                        raise
                    finally:
                        reset_current(token)
        except _Interrupted:
            return _interrupted(lease, logger)
        except Exception as exc:
            if lease.abort.is_set():
                return _interrupted(lease, logger)
            if fn.on_exhausted == "block":
                pause = max(float(policy.wait(state)) if state else 0.0, BLOCK_MIN_PAUSE)
                logger.error("pyfiq.task_blocking_queue", attempts=attempts, error=repr(exc), retry_in=pause)
                if sleep(pause) or lease.abort.is_set():
                    return _interrupted(lease, logger)
                continue
            logger.error("pyfiq.task_dead_lettered", reason="exhausted", attempts=attempts, error=repr(exc))
            return DeadLettered(
                dead_letter_header(
                    "exhausted",
                    replica=ctx.replica,
                    deliveries=ctx.deliveries,
                    attempts=attempts,
                    name=ctx.name,
                    error=exc,
                )
            )
        if lease.lost:
            logger.error("pyfiq.result_dropped", reason=lease.lost_reason)
            return Fenced()
        call_hook(fn.on_success, result, ctx, fn, event="on_success", ctx=ctx)
        return Acked()


def _interrupted(lease: Lease, logger: Any) -> Outcome:
    if lease.lost:
        logger.error("pyfiq.result_dropped", reason=lease.lost_reason)
        return Fenced()
    logger.info("pyfiq.task_interrupted_by_stop")
    return Aborted()


class ThreadedWorker:
    """Consumes pyfiq queues in background threads of this process.

    ``queues``: the queues to consume; by default every queue named by a ``@fifo`` function of
    this process, including ones defined after the worker started. ``concurrency``: how many
    streams run at once, whatever the number of queues. Signal handlers are installed only
    with ``install_signal_handlers=True`` (from the main thread): the first SIGINT/SIGTERM
    stops gracefully, a second one is left to the previous handler.
    """

    def __init__(
        self,
        backend: RedisQueueBackend | None = None,
        *,
        queues: Iterable[str] | None = None,
        concurrency: int = 4,
        install_signal_handlers: bool = False,
        replica: str | None = None,
    ) -> None:
        if concurrency < 1:
            raise ConfigurationError(f"concurrency must be at least 1, got {concurrency}")
        self.backend = backend or registry.get_backend()
        self.settings = self.backend.settings
        self.ops = self.backend.ops
        self.concurrency = concurrency
        self.replica = replica or replica_id()
        self._queues = sorted({validate_queue_name(q) for q in queues}) if queues is not None else None
        self._install_signals = install_signal_handlers
        self._held: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._work: queue_mod.Queue[Lease | None] = queue_mod.Queue()
        self._nudge = threading.Event()
        self._stopping = threading.Event()
        self._abandoned = threading.Event()
        self._stopped = threading.Event()
        self._shard_due = [0.0] * self.backend.keys.shards
        # Shards named by wake-up messages; swapped out by the dispatcher before it looks, so
        # a message that arrives while it looks is kept for the next round, never overwritten.
        self._woken: set[int] = set()
        self._scan_offset = [0] * self.backend.keys.shards
        # Streams handed back for a task this replica cannot run: left to others for a while.
        self._avoid: dict[str, float] = {}
        self._unknown_since: dict[str, float] = {}
        self._threads: list[threading.Thread] = []
        self._dispatcher: threading.Thread | None = None
        self._control: list[threading.Thread] = []
        self._started = False
        self._stop_lock = threading.Lock()
        self.log = log.bind(replica=self.replica)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> ThreadedWorker:
        if self._started:
            return self
        self.backend.check_layout()
        self._started = True
        for i in range(self.concurrency):
            t = threading.Thread(target=self._executor, name=f"pyfiq-exec-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        for target, name in (
            (self._heartbeat, "pyfiq-heartbeat"),
            (self._listen, "pyfiq-wake"),
            (self._dispatch, "pyfiq-dispatch"),
        ):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._control.append(t)
        self._dispatcher = self._control[-1]
        if self._install_signals:
            self._install_signal_handlers()
        self.log.info("pyfiq.worker_started", concurrency=self.concurrency, queues=self._queues)
        return self

    def stop(self, timeout: float = 30.0) -> bool:
        """Finish running tasks, release every lease (hand-off) and return. Idempotent.

        Returns False if a task was still running at ``timeout``: its lease is then left to
        lapse, and the next holder runs that task again.
        """
        with self._stop_lock:
            if self._stopped.is_set() or not self._started:
                self._stopped.set()
                return True
            deadline = time.monotonic() + timeout
            self._stopping.set()
            self._nudge.set()
            # The dispatcher first: a lease it is acquiring right now must reach an executor
            # (which releases it) before the executors are told to exit.
            assert self._dispatcher is not None
            self._dispatcher.join(max(0.0, deadline - time.monotonic()))
            with self._lock:
                for lease in self._held.values():
                    lease.abort.set()  # end retry back-offs; running attempts finish
            for _ in self._threads:
                self._work.put(None)
            clean = True
            # Executors before heartbeats: leases stay renewed while running tasks finish.
            for t in self._threads:
                t.join(max(0.0, deadline - time.monotonic()))
                clean = clean and not t.is_alive()
            self._stopped.set()
            for t in self._control:
                t.join(max(0.0, min(2.0, deadline - time.monotonic())))
            self.log.info("pyfiq.worker_stopped", clean=clean)
            return clean

    def abandon(self) -> None:
        """Stop as if the process had died: no acknowledgement, no release, no more heartbeats.
        Leases lapse after their TTL. For demos and failure tests."""
        self._abandoned.set()
        self._stopping.set()
        self._stopped.set()
        self._nudge.set()
        with self._lock:
            for lease in self._held.values():
                lease.abort.set()
        for _ in self._threads:
            self._work.put(None)

    def __enter__(self) -> ThreadedWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def held_streams(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

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

    def _consumed_queues(self) -> list[str] | None:
        return self._queues if self._queues is not None else registry.registered_queues()

    def _dispatch(self) -> None:
        backoff = 0.0
        while not self._stopping.is_set():
            self._nudge.clear()
            try:
                self._claim()
                backoff = 0.0
            except Exception as exc:
                backoff = min(max(backoff * 2, 0.1), self.settings.poll_interval)
                self.log.warning("pyfiq.claim_failed", error=repr(exc), retry_in=backoff)
                self._nudge.wait(backoff)
                continue
            with self._lock:
                full = len(self._held) >= self.concurrency
            wait = self.settings.poll_interval
            if not full and self._consumed_queues():
                with self._lock:
                    woken = bool(self._woken)
                wait = 0.0 if woken else min(wait, max(0.0, min(self._shard_due) - time.monotonic()))
            if wait > 0:
                self._nudge.wait(wait)

    def _claim(self) -> None:
        with self._lock:
            free = self.concurrency - len(self._held)
            woken, self._woken = self._woken, set()
        queues = self._consumed_queues()
        if free <= 0 or not queues:
            return
        now = time.monotonic()
        for stream, until in list(self._avoid.items()):
            if until <= now:
                del self._avoid[stream]
        shards = [s for s, due in enumerate(self._shard_due) if due <= now or s in woken]
        if not shards:
            return
        want = free + len(self._avoid)
        replies = self.backend.call_many([self.ops.due(s, want, queues, self._scan_offset[s]) for s in shards])
        candidates: list[tuple[int, str]] = []
        for shard, reply in zip(shards, replies, strict=True):
            if isinstance(reply, Exception):
                raise reply
            nxt, offset, streams = self.ops.parse_due(reply)
            self._scan_offset[shard] = offset
            wait = self.settings.poll_interval if nxt is None else min(nxt, self.settings.poll_interval)
            # Page on at once past streams of queues this replica does not consume.
            self._shard_due[shard] = now if offset else now + wait
            candidates += [(shard, s) for s in streams]
        random.shuffle(candidates)  # replicas racing for the same streams spread out
        for shard, stream in candidates:
            if free <= 0 or self._stopping.is_set():
                break
            with self._lock:
                if stream in self._held or stream in self._avoid:
                    continue
            lease = self.ops.parse_acquire(stream, self.backend.call(self.ops.acquire(stream)), threading.Event())
            if lease is None:
                continue
            with self._lock:
                self._held[stream] = lease
            free -= 1
            # It may hold more due streams than it returned: look at this shard again soon.
            self._shard_due[shard] = now
            self.log.debug("pyfiq.lease_acquired", stream=stream, fencing_token=lease.fence)
            self._work.put(lease)

    def _listen(self) -> None:
        pubsub = None
        while not self._stopped.is_set():
            try:
                if pubsub is None:
                    pubsub = self.backend.pubsub()
                    pubsub.subscribe(self.backend.keys.wake_channel)
                    # Anything published while we were not subscribed is found by a look now.
                    self._wake(range(len(self._shard_due)))
                message = pubsub.get_message(timeout=0.5)
                if message and message.get("type") == "message":
                    self._wake([int(message["data"])])
            except Exception as exc:
                self.log.debug("pyfiq.wake_listener_reconnecting", error=repr(exc))
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()
                pubsub = None
                self._stopped.wait(min(1.0, self.settings.poll_interval))
        if pubsub is not None:
            with contextlib.suppress(Exception):
                pubsub.close()

    def _wake(self, shards: Iterable[int]) -> None:
        with self._lock:
            self._woken.update(s for s in shards if 0 <= s < len(self._shard_due))
        self._nudge.set()

    def _heartbeat(self) -> None:
        interval = self.settings.heartbeat
        ttl = self.settings.lease_ttl
        expected = time.monotonic() + interval
        while not self._stopped.wait(max(0.0, expected - time.monotonic())):
            now = time.monotonic()
            late = now - expected
            if late > interval:
                self.log.warning("pyfiq.heartbeat_late", late_by=round(late, 3), interval=interval)
            expected = now + interval
            with self._lock:
                leases = [lease for lease in self._held.values() if not lease.lost]
            if not leases:
                continue
            try:
                replies = self.backend.call_many([self.ops.renew(lease) for lease in leases])
            except Exception as exc:
                replies = [exc] * len(leases)
            for lease, reply in zip(leases, replies, strict=True):
                if isinstance(reply, Exception):
                    # Unknown whether Redis still holds it: assume lost once it must have lapsed.
                    if now - lease.renewed_at >= ttl:
                        lease.mark_lost(f"renewal failed for a whole TTL: {reply!r}")
                        self.log.error("pyfiq.lease_lost", stream=lease.stream, reason=lease.lost_reason)
                elif int(reply) == 1:
                    lease.renewed_at = now
                elif lease.ending:
                    pass  # released (or drained) by its executor a moment ago
                else:
                    lease.mark_lost("renewal refused: the lease lapsed or was taken over")
                    self.log.error(
                        "pyfiq.lease_lost",
                        stream=lease.stream,
                        fencing_token=lease.fence,
                        reason=lease.lost_reason,
                    )

    def _executor(self) -> None:
        while True:
            lease = self._work.get()
            if lease is None:
                return
            try:
                self._run_stream(lease)
            finally:
                with self._lock:
                    self._held.pop(lease.stream, None)
                self._nudge.set()

    def _run_stream(self, lease: Lease) -> None:
        run = StreamRun(self.ops, lease, stopping=self._stopping.is_set, abandoned=self._abandoned.is_set)
        try:
            step = run.start()
            while not isinstance(step, Finished):
                if isinstance(step, RunTask):
                    step = run.feed(self._execute(lease, step))
                else:
                    step = run.feed(self.backend.call(step))
        except BaseException as exc:
            level = "warning" if isinstance(exc, TRANSIENT) else "error"
            getattr(self.log, level)("pyfiq.stream_failed", stream=lease.stream, error=repr(exc))
            call = run.fail()
            if call is not None and not self._abandoned.is_set():
                try:
                    self.backend.call(call)
                except Exception:
                    lease.mark_lost("release failed after an error; the lease will lapse")
            if not isinstance(exc, Exception):
                raise
            return
        if run.deferred is not None:
            self._avoid[lease.stream] = time.monotonic() + max(self.settings.poll_interval, 1.0)
            self.log.warning(
                "pyfiq.task_deferred_unknown",
                stream=lease.stream,
                task_id=run.deferred,
                grace=self.settings.unknown_task_grace,
            )
        if step.reason == "fenced":
            self.log.error("pyfiq.lease_lost", stream=lease.stream, fencing_token=lease.fence, reason=lease.lost_reason)

    def _unknown_for(self, task_id: str) -> float:
        now = time.monotonic()
        with self._lock:
            if len(self._unknown_since) > 10_000:  # bounded: forget the oldest sightings
                self._unknown_since.clear()
            return now - self._unknown_since.setdefault(task_id, now)

    def _execute(self, lease: Lease, step: RunTask) -> Outcome:
        prepared = prepare(
            step.entry,
            step.deliveries,
            lease,
            registry.lookup,
            self.settings,
            self.replica,
            unknown_for=self._unknown_for,
        )
        if isinstance(prepared, Deferred):
            return prepared
        if isinstance(prepared, DeadLettered):
            self.log.error(
                "pyfiq.task_dead_lettered", stream=lease.stream, task_id=step.entry.id, header=prepared.header
            )
            return prepared
        if self._abandoned.is_set():
            return Fenced()
        return run_sync_task(prepared, lease, sleep=lease.abort.wait)  # type: ignore[attr-defined]


def threaded_worker(
    backend: RedisQueueBackend | None = None,
    *,
    queues: Iterable[str] | None = None,
    concurrency: int = 4,
    install_signal_handlers: bool = False,
    replica: str | None = None,
) -> ThreadedWorker:
    """Start a :class:`ThreadedWorker` and make ``backend`` this process's default backend."""
    if backend is not None:
        registry.configure(backend)
    return ThreadedWorker(
        backend,
        queues=queues,
        concurrency=concurrency,
        install_signal_handlers=install_signal_handlers,
        replica=replica,
    ).start()

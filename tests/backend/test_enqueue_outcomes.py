"""One caller, one outcome: every caller of a shared round trip gets its own truthful result
(its handle for a task stored once, or an error saying whether the task may be stored) whatever
another caller does (cancelled, interrupted by a signal handler, forked), and a request that
may have reached Redis is never sent again blindly. Against real redis-server processes."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio.connection

from pyfiq import RedisQueueBackend, TaskHandle, fifo
from pyfiq.errors import BackendUnavailableError, EnqueueOutcomeUnknown
from pyfiq.task import Entry, TaskRecord
from tests.support.helpers import FAST, unique_prefix, wait_until
from tests.support.servers import RedisServer
from tests.workers.test_worker import qname

# Keeps the server busy (every other client waits) for ARGV[1] milliseconds.
BUSY = """
local t = redis.call('TIME')
local stop = tonumber(t[1]) * 1e6 + tonumber(t[2]) + tonumber(ARGV[1]) * 1000
repeat t = redis.call('TIME') until tonumber(t[1]) * 1e6 + tonumber(t[2]) >= stop
return 1
"""


class Interrupted(BaseException):
    """What a signal handler raises, like KeyboardInterrupt: no ``except Exception`` takes it."""


def evalshas(payload: Any) -> int:
    """How many EVALSHA commands a write carries (one chunk, or redis-py's list of chunks)."""
    chunks = payload if isinstance(payload, (list, tuple)) else [payload]
    return sum(bytes(chunk).count(b"EVALSHA") for chunk in chunks)


def busy(server: RedisServer, ms: int) -> threading.Thread:
    """Make the server busy for ``ms`` from another connection; returns once it is."""
    client = server.client()
    runner = threading.Thread(target=lambda: (client.eval(BUSY, 0, ms), client.close()), daemon=True)
    runner.start()
    time.sleep(0.05)
    return runner


def stored_rows(backend: RedisQueueBackend, stream: str) -> Counter[tuple[Any, ...]]:
    raw = backend.client.lrange(backend.keys.stream(stream).pending, 0, -1)
    return Counter(tuple(TaskRecord.decode(Entry.parse(r).payload, backend.settings.serializer).args) for r in raw)


def stored_ids(backend: RedisQueueBackend, stream: str) -> Counter[str]:
    raw = backend.client.lrange(backend.keys.stream(stream).pending, 0, -1)
    return Counter(Entry.parse(r).id for r in raw)


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Callable[[Any], None]]]:
    """Hooks run in the writing thread right before every socket write of the test process."""
    hooks: list[Callable[[Any], None]] = []
    for name in ("send", "sendall"):
        original = getattr(socket.socket, name)

        def hooked(self: socket.socket, data: Any, *args: Any, _original: Any = original) -> Any:
            for hook in list(hooks):
                hook(data)
            return _original(self, data, *args)

        monkeypatch.setattr(socket.socket, name, hooked)
    yield hooks


# -- asyncio: the leader of a shared round trip is cancelled after the write -----------------


@pytest.mark.parametrize("dedup", [False, True], ids=["plain", "dedup_key"])
def test_a_cancelled_leader_leaves_every_other_caller_its_own_handle_asyncio(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, dedup: bool
) -> None:
    """Six asyncio tasks share a round trip; the one leading it is cancelled after the round
    trip's write reached Redis, while the reply is awaited (a request timeout, a client
    disconnect). The round trip goes on: the other five get their handles, no task is stored
    twice, and with a dedup key nobody is told ``duplicate`` for a task it stored itself."""
    q = qname()
    backend = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), **FAST)

    async def job(i: int) -> None:
        pass

    work = fifo(queue=q, name=f"{q}.work")(job)
    original = redis.asyncio.connection.AbstractConnection.send_packed_command
    gate, holding = asyncio.Event(), asyncio.Event()
    holder: list[asyncio.Task[Any]] = []
    leader: list[asyncio.Task[Any]] = []
    cancelled: list[int] = []

    async def hooked(self: Any, command: Any, check_health: bool = True) -> None:
        held = holder and asyncio.current_task() is holder[0]
        if held and not gate.is_set():
            holding.set()
            await gate.wait()  # a round trip held open while the six queue behind it
        if gate.is_set() and not held and evalshas(command) and not cancelled:
            # The first write after the six queued: their round trip. The server is kept busy
            # past it, and the leader is cancelled while the reply is awaited.
            cancelled.append(1)
            busy(redis_server, 400)
            asyncio.get_running_loop().call_later(0.1, leader[0].cancel)
        await original(self, command, check_health)

    def send(i: int) -> Any:
        key = f"d-{q}-{i}" if dedup else None
        return work.asend_with_options(args=(i,), dedup_key=key, backend=backend)

    async def main() -> list[Any]:
        await send(-1)  # the layout check and the script, alone
        monkeypatch.setattr(redis.asyncio.connection.AbstractConnection, "send_packed_command", hooked)
        holder.append(asyncio.ensure_future(send(-2)))
        await asyncio.wait_for(holding.wait(), 5)
        six = [asyncio.ensure_future(send(i)) for i in range(6)]
        for _ in range(3):
            await asyncio.sleep(0)  # each queues behind the round trip held open
        leader.append(six[0])  # the oldest caller waiting leads the next round trip
        gate.set()
        outcomes = await asyncio.wait_for(asyncio.gather(*six, return_exceptions=True), 20)
        await holder[0]
        await asyncio.sleep(0.2)
        await backend.aclose()
        return outcomes

    try:
        outcomes = asyncio.run(main())
        assert cancelled, "the shared round trip was never written"
        assert isinstance(outcomes[0], asyncio.CancelledError)
        handles = outcomes[1:]
        assert all(isinstance(h, TaskHandle) for h in handles), handles
        assert not any(h.duplicate for h in handles), "told duplicate for a task the caller itself stored"
        rows = stored_rows(backend, q)
        assert all(rows[(i,)] == 1 for i in range(6)), f"each task stored once, the leader's too: {rows}"
        ids = stored_ids(backend, q)
        assert all(ids[h.id] == 1 for h in handles)
    finally:
        backend.close()


# -- threads: the leader of a shared round trip gets a BaseException -------------------------


@pytest.mark.parametrize("dedup", [False, True], ids=["plain", "dedup_key"])
def test_an_interrupted_leader_thread_leaves_every_other_caller_its_own_handle(
    redis_server: RedisServer, writes: list[Callable[[Any], None]], dedup: bool
) -> None:
    """The main thread leads a round trip it shares with five threads; a signal handler raises
    in it while it waits for the reply (the server is kept busy meanwhile). The others' replies
    are still read and delivered: each gets its handle, and no task is stored twice."""
    q = qname()
    backend = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), **FAST)
    work = fifo(queue=q, name=f"{q}.work")(lambda i: None)

    def send(i: int) -> TaskHandle:
        key = f"d-{q}-{i}" if dedup else None
        return work.send_with_options(args=(i,), dedup_key=key, backend=backend)

    send(-1)  # the layout check and the script, alone
    main = threading.get_ident()
    gate, holding = threading.Event(), threading.Event()
    armed: list[bool] = []
    fired: list[bool] = []
    outcomes: dict[int, Any] = {}

    def hook(data: Any) -> None:
        if threading.current_thread().name == "holder" and not gate.is_set():
            holding.set()
            gate.wait(10)
        elif threading.get_ident() == main and gate.is_set() and evalshas(data) and not armed:
            # The main thread's first write once the six queued: the round trip it leads. The
            # server is kept busy past it, so the reply keeps the leader waiting when the
            # signal comes.
            busy(redis_server, 400)
            armed.append(True)
            threading.Timer(0.1, signal.pthread_kill, (main, signal.SIGUSR1)).start()

    def interrupt(signum: int, frame: Any) -> None:
        if armed and not fired:
            fired.append(True)
            raise Interrupted

    def produce(i: int) -> None:
        try:
            outcomes[i] = send(i)
        except BaseException as exc:
            outcomes[i] = exc

    def stage() -> None:
        holding.wait(10)
        wait_until(lambda: len(backend.enqueuer._coalescer._queue) == 1, timeout=10)  # the main thread
        for i in range(1, 6):
            threading.Thread(target=produce, args=(i,), name=f"p{i}", daemon=True).start()
        wait_until(lambda: len(backend.enqueuer._coalescer._queue) == 6, timeout=10)
        gate.set()

    writes.append(hook)
    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        threading.Thread(target=produce, args=(-2,), name="holder", daemon=True).start()
        threading.Thread(target=stage, daemon=True).start()
        holding.wait(10)
        try:
            outcomes[0] = send(0)
        except Interrupted as exc:
            outcomes[0] = exc
        wait_until(lambda: all(i in outcomes for i in range(1, 6)), timeout=20)
    finally:
        gate.set()
        writes.clear()
        time.sleep(0.5)  # the busy script ends, no signal is left on its way
        signal.signal(signal.SIGUSR1, previous)
    try:
        assert isinstance(outcomes[0], Interrupted), "the leader was not interrupted while it led"
        handles = [outcomes[i] for i in range(1, 6)]
        assert all(isinstance(h, TaskHandle) for h in handles), handles
        assert not any(h.duplicate for h in handles), "told duplicate for a task the caller itself stored"
        rows = stored_rows(backend, q)
        assert all(rows[(i,)] == 1 for i in range(6)), f"each task stored once, the leader's too: {rows}"
        assert all(stored_ids(backend, q)[h.id] == 1 for h in handles)
        wait_until(lambda: not backend.enqueuer._coalescer._busy, timeout=5, message="the turn handed on")
        assert isinstance(send(7), TaskHandle)
    finally:
        backend.close()


# -- fork --------------------------------------------------------------------------------------


def test_a_fork_inside_a_shared_round_trip_leaves_the_child_free_to_enqueue(
    redis_server: RedisServer, writes: list[Callable[[Any], None]]
) -> None:
    """Four producer threads enqueue in a loop; the process forks while one of them holds a
    shared round trip open, with others waiting behind it. The child (its only thread the
    forking one) enqueues at once and exits, eight times out of eight; the parent goes on."""
    q = qname()
    backend = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), **FAST)
    work = fifo(queue=q, name=f"{q}.work", key=lambda who, i: who)(lambda who, i: None)
    work.send_with_options(args=("parent", -1), backend=backend)
    # Every shard laid out first: a shard's first enqueue goes alone (it lays the shard out),
    # and the round trip held below must be a shared one.
    backend.transport.lay_out(*range(backend.keys.shards))
    stop, gate = threading.Event(), threading.Event()
    held = threading.Condition()
    holding = [0]
    parent = os.getpid()
    errors: list[BaseException] = []

    def hook(data: Any) -> None:
        # A producer's round trip is held at its write while the fork comes.
        mine = os.getpid() == parent and threading.current_thread().name.startswith("producer")
        if mine and evalshas(data) and not gate.is_set():
            with held:
                holding[0] += 1
                held.notify_all()
            gate.wait(10)
            with held:
                holding[0] -= 1

    def produce(p: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                work.send_with_options(args=(f"p{p}", i), backend=backend)
            except Exception as exc:
                errors.append(exc)
            i += 1

    writes.append(hook)
    producers = [threading.Thread(target=produce, args=(p,), name=f"producer-{p}", daemon=True) for p in range(4)]
    for t in producers:
        t.start()
    children: list[str] = []
    try:
        for n in range(8):
            gate.clear()
            with held:
                assert held.wait_for(lambda: holding[0] > 0, 10), "no round trip under way"
            time.sleep(0.05)  # the other producers wait meanwhile: in that round trip, or queued behind it
            assert backend.enqueuer._coalescer._busy
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child
                code = 1
                try:
                    os.close(read_end)
                    handle = work.send_with_options(args=("child", n), backend=backend)
                    os.write(write_end, handle.id.encode())
                    code = 0
                finally:
                    os._exit(code)
            os.close(write_end)
            ready, _, _ = select.select([read_end], [], [], 10)
            task_id = os.read(read_end, 64).decode() if ready else ""
            os.close(read_end)
            if not task_id:
                os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            gate.set()
            assert task_id, f"fork {n + 1}: the child's enqueue did not return within 10 s"
            assert os.waitstatus_to_exitcode(status) == 0
            children.append(task_id)
    finally:
        gate.set()
        writes.clear()
        stop.set()
        for t in producers:
            t.join(20)
    try:
        assert not any(t.is_alive() for t in producers)
        assert errors == []
        ids = stored_ids(backend, f"{q}#child")
        assert [ids[task_id] for task_id in children] == [1] * 8, "each child's task stored once"
        assert sorted(n for (_, n) in stored_rows(backend, f"{q}#child")) == list(range(8))
    finally:
        backend.close()


# -- bounded waits -----------------------------------------------------------------------------


def test_a_waiter_whose_leader_never_answers_gives_up_within_enqueue_timeout(
    redis_server: RedisServer, writes: list[Callable[[Any], None]]
) -> None:
    """A round trip hangs (here: its thread is held before its write); a caller queued behind it
    raises within ``enqueue_timeout`` saying nothing was stored, and it never is."""
    q = qname()
    backend = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), enqueue_timeout=1.0, **FAST)
    work = fifo(queue=q, name=f"{q}.work")(lambda i: None)
    work.send_with_options(args=(-1,), backend=backend)
    holding, release = threading.Event(), threading.Event()

    def hook(data: Any) -> None:
        if threading.current_thread().name == "stuck" and not release.is_set():
            holding.set()
            release.wait(8)

    writes.append(hook)
    stuck = threading.Thread(target=lambda: work.send_with_options(args=(0,), backend=backend), name="stuck")
    stuck.start()
    timer = threading.Timer(3.0, release.set)
    timer.start()
    try:
        assert holding.wait(5)
        t0 = time.monotonic()
        with pytest.raises(BackendUnavailableError) as caught:
            work.send_with_options(args=(1,), backend=backend)
        waited = time.monotonic() - t0
        assert waited < 2.0, f"a waiter waited {waited:.1f} s behind a round trip that never ended"
        assert not isinstance(caught.value, EnqueueOutcomeUnknown), "it was never sent"
        assert "not stored" in str(caught.value)
    finally:
        release.set()
        timer.cancel()
        stuck.join(10)
    try:
        assert stored_rows(backend, q) == Counter({(-1,): 1, (0,): 1})
    finally:
        backend.close()


def test_an_asyncio_waiter_whose_leader_never_answers_gives_up_within_enqueue_timeout(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = qname()
    backend = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), enqueue_timeout=1.0, **FAST)

    async def job(i: int) -> None:
        pass

    work = fifo(queue=q, name=f"{q}.work")(job)
    original = redis.asyncio.connection.AbstractConnection.send_packed_command
    stuck: list[asyncio.Task[Any]] = []

    async def hooked(self: Any, command: Any, check_health: bool = True) -> None:
        if stuck and asyncio.current_task() is stuck[0]:
            await asyncio.sleep(3)
        await original(self, command, check_health)

    async def main() -> float:
        await work.asend_with_options(args=(-1,), backend=backend)
        monkeypatch.setattr(redis.asyncio.connection.AbstractConnection, "send_packed_command", hooked)
        stuck.append(asyncio.ensure_future(work.asend_with_options(args=(0,), backend=backend)))
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        with pytest.raises(BackendUnavailableError, match="not stored") as caught:
            await work.asend_with_options(args=(1,), backend=backend)
        waited = time.monotonic() - t0
        assert not isinstance(caught.value, EnqueueOutcomeUnknown)
        await stuck[0]
        await backend.aclose()
        return waited

    try:
        waited = asyncio.run(main())
        assert waited < 2.0, f"a waiter waited {waited:.1f} s behind a round trip that never ended"
        assert stored_rows(backend, q) == Counter({(-1,): 1, (0,): 1})
    finally:
        backend.close()


# -- a request that may have run is never sent again blindly ----------------------------------


@pytest.mark.parametrize("side", ["sync", "asyncio"])
@pytest.mark.parametrize("dedup", [False, True], ids=["plain", "dedup_key"])
def test_a_request_whose_reply_is_lost_after_the_write_is_not_sent_again_blindly(
    redis_server: RedisServer, side: str, dedup: bool
) -> None:
    """Redis is busy past the client's socket timeout: the enqueue's request is written and runs
    later, but its reply comes too late. Without a dedup key the caller is told the task MAY be
    stored (and it is, once); with one, the re-send is safe and the caller gets its handle, not
    a false ``duplicate``. Either way the task is stored exactly once."""
    q = qname()
    backend = RedisQueueBackend(
        redis_server.url,
        prefix=unique_prefix(),
        enqueue_timeout=3.0,
        redis_options={"socket_timeout": 0.3},
        **FAST,
    )

    async def job(i: int) -> None:
        pass

    work = fifo(queue=q, name=f"{q}.work")(job)
    key = f"d-{uuid.uuid4().hex}" if dedup else None

    def attempt() -> Any:
        try:
            return work.send_with_options(args=(0,), dedup_key=key, backend=backend)
        except BackendUnavailableError as exc:
            return exc

    async def aattempt() -> Any:
        try:
            await work.asend_with_options(args=(-1,), backend=backend)  # connected on this loop
            runner = busy(redis_server, 1200)
            try:
                return await work.asend_with_options(args=(0,), dedup_key=key, backend=backend)
            except BackendUnavailableError as exc:
                return exc
            finally:
                runner.join(5)
        finally:
            await backend.aclose()

    try:
        if side == "sync":
            work.send_with_options(args=(-1,), backend=backend)  # connected, laid out, the script loaded
            runner = busy(redis_server, 1200)
            outcome = attempt()
            runner.join(5)
        else:
            backend.check_layout()
            outcome = asyncio.run(aattempt())
        wait_until(lambda: stored_rows(backend, q)[(0,)] >= 1, timeout=5)
        time.sleep(0.3)
        assert stored_rows(backend, q)[(0,)] == 1, "the task was stored more than once"
        if dedup:
            assert isinstance(outcome, TaskHandle) and not outcome.duplicate, outcome
            assert stored_ids(backend, q)[outcome.id] == 1
        else:
            assert isinstance(outcome, EnqueueOutcomeUnknown), outcome
            assert "MAY be stored" in str(outcome)
            assert stored_ids(backend, q)[outcome.task_ids[0]] == 1
    finally:
        backend.close()


def test_a_sentinel_naming_no_primary_ran_nothing_so_the_enqueue_is_retried() -> None:
    """During a Sentinel failover redis-py raises MasterNotFoundError before it sends anything:
    retried as any refusal, not reported as a request that may be stored (which a failover
    test saw 94 times out of 94 before)."""
    import redis.asyncio.sentinel
    import redis.sentinel

    from pyfiq.backend.failures import never_ran

    assert never_ran(redis.sentinel.MasterNotFoundError("No master found for 'mymaster'"))
    assert never_ran(redis.asyncio.sentinel.MasterNotFoundError("No master found for 'mymaster'"))
    assert not never_ran(redis.ConnectionError("Connection closed by server."))

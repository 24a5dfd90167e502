"""Edges of the backend an outside review reproduced: the asyncio side of a backend built on a
given client, an ``enqueue_many`` that fails part-way, and settings Redis would refuse.

Every server here is one the suite started (``redis_server``) or one this module starts; a
backend that must not reach any server points at a free port, never at the default URL."""

from __future__ import annotations

import asyncio
import math
import pickle
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
import redis.asyncio
import redis.sentinel

import pyfiq
from pyfiq import (
    AsyncWorker,
    BackendUnavailableError,
    ConfigurationError,
    PartialEnqueueError,
    RedisQueueBackend,
    Settings,
    fifo,
)
from pyfiq.task import EncodedTask, Entry, new_task_id
from pyfiq_harness.proxy import FaultProxy
from pyfiq_harness.servers import free_port
from tests.support.helpers import FAST, unique_prefix, wait_until
from tests.support.servers import RedisServer

PASSWORD = "s3cret-pw-do-not-print"


def qname() -> str:
    return f"edge-{uuid.uuid4().hex[:8]}"


def nowhere() -> str:
    """A URL on which no server listens: what the old code fell back to must fail loudly here."""
    return f"redis://127.0.0.1:{free_port()}/0"


def pending(backend: RedisQueueBackend, stream: str) -> int:
    return int(backend.client.llen(backend.keys.stream(stream).pending))


def stored_ids(backend: RedisQueueBackend, stream: str) -> list[str]:
    return [Entry.parse(raw).id for raw in backend.client.lrange(backend.keys.stream(stream).pending, 0, -1)]


# -- 1. the asyncio side comes from the same connection description as the sync side ---------


@pytest.fixture
def private_redis() -> Iterator[Path]:
    """A redis-server reachable only on a unix socket and only with a password: what a client
    carries over (socket path, password, database) must be carried over, or nothing works."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed: run scripts/test.sh, which installs it")
    # A short directory: a unix socket path is limited to about 100 bytes.
    directory = Path(tempfile.mkdtemp(prefix="pyfiq-"))
    sock = directory / "redis.sock"
    args = ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700", "--requirepass", PASSWORD]
    proc = subprocess.Popen(
        [server, *args, "--save", "", "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        probe = redis.Redis(unix_socket_path=str(sock), password=PASSWORD)
        deadline = time.monotonic() + 10
        while True:
            try:
                probe.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    pytest.fail("the unix-socket redis-server did not start")
                time.sleep(0.02)
        probe.close()
        yield sock
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


def test_async_enqueue_goes_where_the_given_sync_client_goes(redis_server: RedisServer) -> None:
    q = qname()
    client = redis.Redis(port=redis_server.port)
    # The default URL (localhost:6379) is never contacted: the pool is checked before any I/O.
    backend = RedisQueueBackend(client=client, prefix=unique_prefix(), **FAST)
    assert backend.async_client.connection_pool.connection_kwargs["port"] == redis_server.port
    assert str(redis_server.port) in repr(backend)

    @fifo(queue=q, name=f"{q}.deliver")
    async def deliver(i: int) -> None:
        pass

    async def main() -> None:
        await deliver.asend_with_options(args=(1,), backend=backend)
        await backend.aclose()

    asyncio.run(main())
    assert pending(backend, q) == 1


def test_async_enqueue_and_async_worker_ignore_the_url_when_a_client_is_given(redis_server: RedisServer) -> None:
    q, seen = qname(), []
    backend = RedisQueueBackend(
        nowhere(), client=redis.Redis(port=redis_server.port), prefix=unique_prefix(), enqueue_attempts=1, **FAST
    )
    pyfiq.configure(backend)

    @fifo(queue=q, name=f"{q}.deliver")
    async def deliver(i: int) -> None:
        seen.append(i)

    async def main() -> None:
        handle = await deliver(7)
        assert not handle.duplicate
        assert pending(backend, q) == 1
        async with AsyncWorker(backend, queues=[q]):
            for _ in range(250):
                if seen:
                    break
                await asyncio.sleep(0.02)
        await backend.aclose()

    asyncio.run(main())
    assert seen == [7]


def test_a_password_protected_unix_socket_client_is_carried_over(private_redis: Path) -> None:
    q, seen = qname(), []
    client = redis.Redis(unix_socket_path=str(private_redis), password=PASSWORD, db=3)
    backend = RedisQueueBackend(nowhere(), client=client, prefix=unique_prefix(), enqueue_attempts=1, **FAST)
    assert PASSWORD not in repr(backend)

    @fifo(queue=q, name=f"{q}.deliver")
    async def deliver(i: int) -> None:
        seen.append(i)

    async def main() -> None:
        await deliver.asend_with_options(args=(1,), backend=backend)
        assert client.llen(backend.keys.stream(q).pending) == 1  # database 3 of that server
        async with AsyncWorker(backend, queues=[q]):
            for _ in range(250):
                if seen:
                    break
                await asyncio.sleep(0.02)
        await backend.aclose()

    asyncio.run(main())
    assert seen == [1]
    assert redis.Redis(unix_socket_path=str(private_redis), password=PASSWORD, db=0).dbsize() == 0


def test_an_async_client_alone_gives_the_sync_side_too(redis_server: RedisServer) -> None:
    q = qname()

    @fifo(queue=q, name=f"{q}.work")
    def work(i: int) -> None:
        pass

    async def main() -> None:
        backend = RedisQueueBackend(
            nowhere(), async_client=redis.asyncio.Redis(port=redis_server.port), prefix=unique_prefix(), **FAST
        )
        work.send_with_options(args=(1,), backend=backend)  # the sync side
        await work.asend_with_options(args=(2,), backend=backend)
        assert pending(backend, q) == 2
        await backend.aclose()
        backend.close()

    asyncio.run(main())


@pytest.mark.parametrize("shared_server", [True, False], ids=["FakeServer", "implicit-server"])
def test_a_fakeredis_client_works_on_both_sides(shared_server: bool) -> None:
    q = qname()
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer()) if shared_server else fakeredis.FakeRedis()
    backend = RedisQueueBackend(nowhere(), client=client, prefix=unique_prefix(), enqueue_attempts=1, **FAST)

    @fifo(queue=q, name=f"{q}.work")
    async def work(i: int) -> None:
        pass

    async def main() -> None:
        await work.asend_with_options(args=(1,), backend=backend)
        await backend.aclose()

    asyncio.run(main())
    work.send_with_options(args=(2,), backend=backend)
    assert pending(backend, q) == 2


def test_a_client_whose_pool_cannot_be_carried_over_fails_clearly_on_first_async_use() -> None:
    sentinel = redis.sentinel.Sentinel([("127.0.0.1", free_port())], socket_timeout=0.1)
    client = sentinel.master_for("mymaster", password=PASSWORD)
    backend = RedisQueueBackend(nowhere(), client=client, prefix=unique_prefix(), enqueue_attempts=1)
    q = qname()

    @fifo(queue=q, name=f"{q}.work")
    async def work() -> None:
        pass

    with pytest.raises(ConfigurationError, match="pass async_client=") as info:
        backend.async_client  # noqa: B018 - the first use is what must fail
    assert PASSWORD not in str(info.value)

    async def main() -> None:
        with pytest.raises(ConfigurationError, match="SentinelManagedConnection"):
            await work.asend_with_options(backend=backend)

    asyncio.run(main())

    async def with_both() -> None:
        given = redis.asyncio.Redis(port=free_port())
        both = RedisQueueBackend(nowhere(), client=client, async_client=given)
        assert both.async_client is given

    asyncio.run(with_both())


def test_the_twin_copies_tls_credentials_database_timeouts_and_pool() -> None:
    sync = redis.Redis.from_url(
        f"rediss://app:{PASSWORD}@cache.internal:6380/4?ssl_cert_reqs=none",
        socket_timeout=2.5,
        max_connections=7,
    )
    backend = RedisQueueBackend(client=sync)
    pool = backend.async_client.connection_pool
    kw = pool.connection_kwargs
    assert pool.connection_class is redis.asyncio.connection.SSLConnection
    assert (kw["host"], kw["port"], kw["db"], kw["username"], kw["password"]) == (
        "cache.internal",
        6380,
        4,
        "app",
        PASSWORD,
    )
    assert (kw["ssl_cert_reqs"], kw["socket_timeout"], pool.max_connections) == ("none", 2.5, 7)
    assert repr(backend) == "RedisQueueBackend('rediss://cache.internal:6380/4')"

    blocking = redis.Redis(connection_pool=redis.BlockingConnectionPool(port=1, max_connections=3, timeout=4))
    twin = RedisQueueBackend(client=blocking).async_client.connection_pool
    assert isinstance(twin, redis.asyncio.BlockingConnectionPool)
    assert (twin.max_connections, twin.timeout) == (3, 4)


def test_messages_never_show_the_password() -> None:
    backend = RedisQueueBackend(
        f"redis://app:{PASSWORD}@127.0.0.1:{free_port()}/0", enqueue_attempts=1, enqueue_timeout=0.5
    )
    q = qname()

    @fifo(queue=q, name=f"{q}.work")
    def work() -> None:
        pass

    with pytest.raises(BackendUnavailableError) as info:
        work.send_with_options(backend=backend)
    assert PASSWORD not in str(info.value) and "app:***@" in str(info.value)
    assert PASSWORD not in repr(backend)


# -- 2. enqueue_many reports exactly what Redis holds, and a retry stores the rest once -------


class FaultAfter(RedisQueueBackend):
    """Applies a fault right after a chosen number of enqueue round trips have been answered."""

    fault: Callable[[], None] | None = None
    answered_before_fault = 1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        enqueue = self.enqueuer.enqueue

        def answered_then_fault(
            stream: str, tasks: Sequence[EncodedTask], dedup_keys: Sequence[str] | None = None
        ) -> list[tuple[str, bool]]:
            reply = enqueue(stream, tasks, dedup_keys)
            self.answered_before_fault -= 1
            if self.answered_before_fault == 0 and self.fault is not None:
                self.fault()
            return reply

        self.enqueuer.enqueue = answered_then_fault  # type: ignore[method-assign]


def test_enqueue_many_cut_after_the_first_chunk_says_what_was_stored_and_a_retry_stores_the_rest(
    redis_server: RedisServer,
) -> None:
    q, prefix = qname(), unique_prefix()
    direct = RedisQueueBackend(redis_server.url, prefix=prefix, **FAST)

    @fifo(queue=q, name=f"{q}.work")
    def work(i: int) -> None:
        pass

    calls = [(i,) for i in range(1200)]
    with FaultProxy(redis_server.port) as proxy:
        backend = FaultAfter(proxy.url, prefix=prefix, enqueue_attempts=2, enqueue_timeout=1.0, **FAST)
        backend.fault = proxy.cut
        with pytest.raises(PartialEnqueueError) as info:
            work.enqueue_many(calls, backend=backend, batch_id="import-1")
        err = info.value
        assert isinstance(err, BackendUnavailableError)
        assert err.accepted == list(range(500))
        # The cut connection refused every try of the second chunk before it was written.
        assert err.unknown == []
        assert err.unsent == list(range(500, 1200))
        assert [h.id for h in err.accepted_handles] == stored_ids(direct, q)
        assert pending(direct, q) == 500
        assert "confirmed 500 of 1200" in str(err)
        assert isinstance(pickle.loads(pickle.dumps(err)), PartialEnqueueError)

        proxy.heal()
        handles = work.enqueue_many(calls, backend=backend, batch_id="import-1")
    assert pending(direct, q) == 1200
    assert [h.duplicate for h in handles] == [True] * 500 + [False] * 700
    assert [h.id for h in handles[:500]] == [h.id for h in err.accepted_handles]
    assert stored_ids(direct, q) == [h.id for h in handles]  # every call once, in call order


def test_enqueue_many_whose_reply_is_lost_stores_that_chunk_once_with_a_batch_id(
    redis_server: RedisServer,
) -> None:
    q, prefix = qname(), unique_prefix()
    direct = RedisQueueBackend(redis_server.url, prefix=prefix, **FAST)

    @fifo(queue=q, name=f"{q}.work")
    def work(i: int) -> None:
        pass

    calls = [(i,) for i in range(1200)]
    with FaultProxy(redis_server.port) as proxy:
        # Each way takes 1 s: the second chunk reaches Redis and is stored after 1 s, its reply
        # would arrive after 2 s, and the client gives up waiting after 1.5 s.
        backend = FaultAfter(
            proxy.url,
            prefix=prefix,
            enqueue_attempts=1,
            enqueue_timeout=2.0,
            redis_options={"socket_timeout": 1.5},
            **FAST,
        )
        backend.fault = lambda: proxy.delay(1.0)
        with pytest.raises(PartialEnqueueError) as info:
            work.enqueue_many(calls, backend=backend, batch_id="import-2")
        err = info.value
        assert (err.accepted, err.unknown, err.unsent) == (
            list(range(500)),
            list(range(500, 1000)),
            list(range(1000, 1200)),
        )
        proxy.heal()
        # The requests still travelling reach Redis at most 1 s after they were sent.
        time.sleep(1.5)
        assert pending(direct, q) == 1000, "the second chunk was stored although its reply was lost"
        handles = work.enqueue_many(calls, backend=backend, batch_id="import-2")
    assert pending(direct, q) == 1200
    assert [h.duplicate for h in handles] == [True] * 1000 + [False] * 200
    assert stored_ids(direct, q) == [h.id for h in handles]


def test_enqueue_many_over_several_streams_reports_indexes_of_the_calls(redis_server: RedisServer) -> None:
    q, prefix = qname(), unique_prefix()
    direct = RedisQueueBackend(redis_server.url, prefix=prefix, **FAST)

    @fifo(queue=q, name=f"{q}.work", key=lambda customer, i: customer)
    def work(customer: str, i: int) -> None:
        pass

    # Streams in order of first appearance: a (0, 3, 6), b (1, 4, 7), c (2, 5, 8).
    calls = [(c, i) for i in range(3) for c in "abc"]
    with FaultProxy(redis_server.port) as proxy:
        backend = FaultAfter(proxy.url, prefix=prefix, enqueue_attempts=1, enqueue_timeout=0.5, **FAST)
        backend.fault = proxy.cut
        with pytest.raises(PartialEnqueueError) as info:
            work.enqueue_many(calls, backend=backend)
    err = info.value
    # b's call found the connection cut before it was written: never sent, like c's.
    assert (err.accepted, err.unknown, err.unsent) == ([0, 3, 6], [], [1, 2, 4, 5, 7, 8])
    assert [h.stream for h in err.accepted_handles] == [f"{q}#a"] * 3
    assert stored_ids(direct, f"{q}#a") == [h.id for h in err.accepted_handles]
    assert pending(direct, f"{q}#b") == 0 and pending(direct, f"{q}#c") == 0
    assert "pass batch_id=" in str(err)


def test_batch_id_deduplicates_per_call_and_the_default_stores_no_dedup_keys(
    redis_backend: RedisQueueBackend,
) -> None:
    q = qname()

    @fifo(queue=q, name=f"{q}.work")
    def work(i: int) -> None:
        pass

    def dedup_keys() -> int:
        return sum(1 for _ in redis_backend.client.scan_iter(match=f"{redis_backend.keys.prefix}:*dedup:*"))

    work.enqueue_many([(i,) for i in range(10)], backend=redis_backend)
    assert dedup_keys() == 0
    first = work.enqueue_many([(i,) for i in range(10)], backend=redis_backend, batch_id="b")
    assert dedup_keys() == 10 and not any(h.duplicate for h in first)
    again = work.enqueue_many([(i,) for i in range(12)], backend=redis_backend, batch_id="b")
    assert [h.duplicate for h in again] == [True] * 10 + [False] * 2
    assert [h.id for h in again[:10]] == [h.id for h in first]
    assert pending(redis_backend, q) == 22
    # The documented key of call i: a single send can join the same batch.
    assert work.send_with_options(args=(11,), dedup_key="b:11", backend=redis_backend).duplicate
    with pytest.raises(ConfigurationError, match="batch_id"):
        work.enqueue_many([(1,)], backend=redis_backend, batch_id="")


# -- 3. every time setting is one Redis (and Python) accepts -----------------------------------


@pytest.mark.parametrize("name", ["lease_ttl", "dedup_window"])
@pytest.mark.parametrize("value", [0.0004, 0.0009999, 0, -1])
def test_windows_and_ttls_below_one_millisecond_are_refused(name: str, value: float) -> None:
    with pytest.raises(ConfigurationError, match=rf"{name} must be at least 0\.001 seconds, got {value!r}"):
        Settings(**{name: value})


TIME_SETTINGS = [
    "lease_ttl",
    "dedup_window",
    "heartbeat_interval",
    "poll_interval",
    "unknown_task_grace",
    "enqueue_timeout",
]
BAD_TIMES = [math.nan, math.inf, -math.inf, "10", True, None, 2e9]


@pytest.mark.parametrize(
    ("name", "value"),
    # None is heartbeat_interval's default (lease_ttl / 5), so it is no bad value there.
    [(n, v) for n in TIME_SETTINGS for v in BAD_TIMES if not (n == "heartbeat_interval" and v is None)],
)
def test_time_settings_must_be_finite_numbers_in_range(name: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=name) as info:
        Settings(**{name: value})
    assert repr(value) in str(info.value) or str(value) in str(info.value)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("poll_interval", 0, "poll_interval must be positive seconds, got 0"),
        ("enqueue_timeout", -0.5, "enqueue_timeout must be positive seconds, got -0.5"),
        ("heartbeat_interval", 0.0, "heartbeat_interval must be positive seconds, got 0.0"),
        ("unknown_task_grace", -1, "unknown_task_grace must be >= 0 seconds, got -1"),
    ],
)
def test_python_side_times_say_what_is_wrong(name: str, value: float, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Settings(**{name: value})


def test_the_smallest_accepted_times_are_accepted_by_redis(redis_server: RedisServer) -> None:
    settings = Settings(
        prefix=unique_prefix(), lease_ttl=0.003, heartbeat_interval=0.001, dedup_window=0.001, unknown_task_grace=0
    )
    assert settings.lease_ttl_ms == 3
    backend = RedisQueueBackend(redis_server.url, settings)
    q = qname()

    @fifo(queue=q, name=f"{q}.work")
    def work() -> None:
        pass

    assert not work.send_with_options(dedup_key="d", backend=backend).duplicate
    wait_until(lambda: not work.send_with_options(dedup_key="d", backend=backend).duplicate, timeout=2)


@pytest.mark.parametrize("value", [math.nan, math.inf, 2e9, "5"])
def test_a_per_call_expiry_redis_cannot_take_is_refused(value: Any) -> None:
    backend = RedisQueueBackend(f"memory://{uuid.uuid4().hex}")
    q = qname()

    @fifo(queue=q, name=f"{q}.work")
    def work() -> None:
        pass

    with pytest.raises(ConfigurationError, match="expires_in"):
        work.send_with_options(expires_in=value, backend=backend)
    assert pending(backend, q) == 0


@pytest.mark.parametrize("dedup", [False, True])
def test_one_enqueue_call_larger_than_a_push_slice_stores_every_task_in_order(
    redis_backend: RedisQueueBackend, dedup: bool
) -> None:
    """enqueue.lua appends with one RPUSH per 1,000 entries: Lua's unpack() refuses more than
    about 8,000 values, and coalesced enqueues can put more tasks than that in one call. All
    9,001 are kept, in order, and answered; with dedup keys, a key repeated in the call is a
    duplicate of the first."""
    stream = qname()
    items = [EncodedTask(new_task_id(), 0, "0", f"payload-{i}".encode()) for i in range(9001)]
    keys = [f"k{i}" for i in range(9000)] + ["k7"] if dedup else None
    reply = redis_backend.enqueuer.enqueue(stream, items, keys)
    assert [task_id for task_id, _ in reply[:-1]] == [item.id for item in items[:-1]]
    assert all(new for _, new in reply[:-1])
    if dedup:
        assert reply[-1] == (items[7][0], False)
        assert stored_ids(redis_backend, stream) == [item.id for item in items[:-1]]
    else:
        assert reply[-1] == (items[-1][0], True)
        assert stored_ids(redis_backend, stream) == [item.id for item in items]

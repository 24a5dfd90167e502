"""A password in the Redis URL never shows: not in an exception (its message, repr, causes or
traceback), not in a repr, not in a log record, not in a command's output, whatever fails:
Redis unreachable, a wrong password, Redis dying under a running worker, over every entry
point (enqueue, its asyncio twin, enqueue_many, both workers, the CLI, the exporter)."""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from pyfiq import AsyncWorker, PyfiqError, RedisQueueBackend, ThreadedWorker, fifo
from pyfiq.ops.cli import main
from pyfiq.ops.exporter import snapshot
from pyfiq_harness.servers import free_port
from tests.support.helpers import unique_prefix, wait_until
from tests.support.servers import RedisServer
from tests.workers.test_worker import qname

SECRET = "Sup3r-S3cret-pw"


@pytest.fixture
def app_user(redis_server: RedisServer) -> Iterator[str]:
    """A user with every permission and the password SECRET."""
    name = f"app-{unique_prefix()}"
    admin = redis_server.client()
    admin.execute_command("ACL", "SETUSER", name, "on", f">{SECRET}", "~*", "&*", "+@all")
    yield name
    admin.execute_command("ACL", "DELUSER", name)
    admin.close()


def _urls(redis_server: RedisServer, user: str) -> dict[str, str]:
    down = free_port()
    return {
        "unreachable": f"redis://{user}:{SECRET}@127.0.0.1:{down}/0",
        "unreachable-query": f"redis://127.0.0.1:{down}/0?username={user}&password={SECRET}",
        "wrong-password": f"redis://{user}:{SECRET}-not@127.0.0.1:{redis_server.port}/0",
    }


def _assert_clean(exc: BaseException) -> None:
    text = "".join(traceback.format_exception(exc)) + repr(exc)
    assert SECRET not in text, text


def _entry_points(backend: RedisQueueBackend) -> dict[str, Callable[[], Any]]:
    q = qname()

    @fifo(queue=q, name=f"{q}.work")
    def work(i: int = 0) -> None:
        pass

    return {
        "enqueue": lambda: work.send_with_options(backend=backend),
        "aenqueue": lambda: asyncio.run(work.asend_with_options(backend=backend)),
        "enqueue_many": lambda: work.enqueue_many([(1,), (2,)], backend=backend),
        "queue_info": lambda: backend.queue_info(q),
        "exporter snapshot": lambda: snapshot(backend),
    }


def _run_workers(backend: RedisQueueBackend) -> list[BaseException]:
    """Start both workers: a denied one raises at start; one that cannot reach Redis starts,
    logs, and keeps trying until stopped."""
    errors: list[BaseException] = []
    try:
        worker = ThreadedWorker(backend, queues=[qname()]).start()
        time.sleep(0.5)
        worker.stop(timeout=5)
    except PyfiqError as exc:
        errors.append(exc)

    async def run_async() -> None:
        worker = AsyncWorker(RedisQueueBackend(backend.url, prefix=backend.settings.prefix), queues=[qname()])
        await worker.start()
        await asyncio.sleep(0.5)
        await worker.stop(timeout=5)

    try:
        asyncio.run(run_async())
    except PyfiqError as exc:
        errors.append(exc)
    return errors


@pytest.mark.parametrize("fault", ["unreachable", "unreachable-query", "wrong-password"])
def test_no_error_path_shows_the_password(redis_server: RedisServer, app_user: str, fault: str, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG, logger="pyfiq")
    url = _urls(redis_server, app_user)[fault]
    backend = RedisQueueBackend(url, enqueue_timeout=0.3, prefix=unique_prefix())
    assert SECRET not in repr(backend) and SECRET not in str(backend) and "***" in repr(backend)
    failed = []
    for name, call in _entry_points(backend).items():
        with pytest.raises(Exception) as info:
            call()
        failed.append((name, type(info.value).__name__))
        assert isinstance(info.value, (PyfiqError, redis.RedisError)), (name, info.value)
        _assert_clean(info.value)
    assert len(failed) == 5
    denied = _run_workers(backend)
    assert len(denied) == (2 if fault == "wrong-password" else 0)
    for exc in denied:
        _assert_clean(exc)
    backend.close()
    assert any("redis_unreachable_at_start" in r.getMessage() for r in caplog.records) == (fault != "wrong-password")
    for record in caplog.records:
        assert SECRET not in record.getMessage(), record.getMessage()
    for args in (["status"], ["dlq", "list", "some-queue"], ["queue", "pause", "some-queue"], ["replicas"]):
        result = CliRunner().invoke(main, ["--redis", url, *args])
        assert result.exit_code != 0 and result.output.strip(), (args, result.output)
        assert SECRET not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_a_worker_whose_redis_dies_logs_no_password(own_redis: RedisServer, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG, logger="pyfiq")
    admin = own_redis.client()
    admin.execute_command("ACL", "SETUSER", "app", "on", f">{SECRET}", "~*", "&*", "+@all")
    url = f"redis://app:{SECRET}@127.0.0.1:{own_redis.port}/0"
    backend = RedisQueueBackend(url, prefix=unique_prefix(), lease_ttl=1.5, poll_interval=0.2, shards=2)
    q, ran = qname(), []

    @fifo(queue=q, name=f"{q}.work")
    def work(i: int) -> None:
        ran.append(i)

    worker = ThreadedWorker(backend, queues=[q]).start()
    try:
        work.send_with_options(args=(1,), backend=backend)
        wait_until(lambda: ran == [1], message="the task ran")
        own_redis.stop(kill=True)
        wait_until(
            lambda: any("ConnectionError" in r.getMessage() for r in caplog.records),
            message="the worker reported Redis unreachable",
        )
    finally:
        worker.stop(timeout=5)
        backend.close()
    messages = [r.getMessage() for r in caplog.records]
    assert any(str(own_redis.port) in m for m in messages), "errors name the server"
    assert not [m for m in messages if SECRET in m]


# -- reprs of everything that holds a secret ---------------------------------------------------


def _reachable(root: Any, name: str) -> list[tuple[str, Any]]:
    """``root`` and every value reachable from it through the attributes (public or not) of
    pyfiq's own objects: what a debugger, ``pytest --showlocals`` or an error tracker shows."""
    seen: set[int] = set()
    found: list[tuple[str, Any]] = []
    todo = [(name, root)]
    while todo:
        path, obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        found.append((path, obj))
        if type(obj).__module__.startswith("pyfiq") and hasattr(obj, "__dict__"):
            todo += [(f"{path}.{attr}", value) for attr, value in vars(obj).items()]
        elif isinstance(obj, tuple):
            todo += [(f"{path}[{i}]", value) for i, value in enumerate(obj)]
    return found


def _assert_reprs_clean(root: Any, name: str) -> int:
    objects = _reachable(root, name)
    for path, obj in objects:
        assert SECRET not in repr(obj), (path, repr(obj))
        if not isinstance(obj, str):  # a string's str() is itself: the URL as given
            assert SECRET not in str(obj), (path, str(obj))
    return len(objects)


def _secret_options(user: str) -> dict[str, dict[str, Any]]:
    return {
        "url password": {"url": f"redis://{user}:{SECRET}@127.0.0.1:{{port}}/0"},
        "query password": {"url": f"redis://127.0.0.1:{{port}}/0?username={user}&password={SECRET}"},
        "redis_options": {
            "url": "redis://127.0.0.1:{port}/0",
            "redis_options": {"username": user, "password": SECRET},
        },
    }


@pytest.mark.parametrize("case", ["url password", "query password", "redis_options"])
def test_no_object_reachable_from_a_backend_shows_the_password(
    redis_server: RedisServer, app_user: str, case: str
) -> None:
    given = _secret_options(app_user)[case]
    url = given["url"].format(port=redis_server.port)
    backend = RedisQueueBackend(url, prefix=unique_prefix(), redis_options=given.get("redis_options", {}))
    # Use both sides, so that everything built lazily exists too.
    assert backend.queue_info("q")["pending"] == 0
    assert asyncio.run(_async_ping(backend))
    copied = backend.copy()
    assert _assert_reprs_clean(backend, "backend") > 20
    _assert_reprs_clean(copied, "copy")
    assert "***" in repr(backend.settings) + repr(backend.url)
    assert backend.url == url, "the URL itself is kept as given: only its repr hides the password"
    backend.close()
    copied.close()


async def _async_ping(backend: RedisQueueBackend) -> bool:
    try:
        return bool(await backend.async_client.ping())
    finally:
        await backend.aclose()


def test_every_secret_option_shows_as_stars() -> None:
    from pyfiq import Settings
    from pyfiq.backend.connect import Topology

    options = {
        "password": SECRET,
        "ssl_password": SECRET,
        "client_secret": SECRET,
        "auth_token": SECRET,
        "sentinel_kwargs": {"password": SECRET, "socket_timeout": 1},
        "proxy_url": f"redis://u:{SECRET}@proxy:1/0",
        "socket_timeout": 3,
    }
    settings = Settings(redis_options=options)
    topology = Topology("sentinel", sentinels=(("s1", 26379),), options=options, sentinel_options=options)
    for obj in (settings, settings.redis_options, topology, topology.options, topology.sentinel_options):
        assert SECRET not in repr(obj) and SECRET not in str(obj), repr(obj)
    assert "socket_timeout': 3" in repr(settings), "options that are not secrets still show"
    assert settings.redis_options == options and settings.replace(shards=2).redis_options == options


def test_the_sentinel_paths_show_no_password() -> None:
    import click

    from pyfiq import Settings
    from pyfiq.ops.cli import _connect, connection_options

    down = free_port()
    backend = RedisQueueBackend.from_sentinel(
        [("127.0.0.1", down)], "mymaster", redis_options={"password": SECRET}, sentinel_options={"password": SECRET}
    )
    _assert_reprs_clean(backend, "from_sentinel")
    backend.close()
    # The CLI moves the URL's credentials into the primary's options.
    given = connection_options(False, (f"127.0.0.1:{down}",), "mymaster", None, None, None)
    with click.Context(main, obj=given):
        backend = _connect(f"redis://app:{SECRET}@ignored.invalid:1/0", Settings(prefix=unique_prefix()))
    assert backend.settings.redis_options["password"] == SECRET
    _assert_reprs_clean(backend, "cli sentinel")
    backend.close()


@pytest.mark.parametrize(
    "url",
    [
        f":{SECRET}@127.0.0.1:6379/0",  # no scheme
        f"redis:/:{SECRET}@127.0.0.1:6379/0",  # one slash
        f"redis:app:{SECRET}@127.0.0.1:6379/0",  # no slashes
        f"redis//:{SECRET}@127.0.0.1:6379/0",  # no colon
    ],
)
def test_a_mistyped_url_shows_no_password(url: str) -> None:
    """A URL urlsplit cannot read as scheme://user:password@host is refused with a message that
    shows none of what came before its "@" (before: the URL as typed, password and all)."""
    with pytest.raises(PyfiqError) as info:
        RedisQueueBackend(url)
    assert SECRET not in str(info.value) and "***@127.0.0.1" in str(info.value)
    result = CliRunner().invoke(main, ["--redis", url, "status"])
    assert result.exit_code != 0 and SECRET not in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["--sentinel", "127.0.0.1:1", "--redis", f":{SECRET}@h:6379/0", "status"],
        ["--sentinel", "127.0.0.1:1", "--redis", f"tcp://:{SECRET}@h:6379/0", "status"],
        ["--cluster", "--redis", f"unix://:{SECRET}@/tmp/x.sock", "status"],
    ],
)
def test_a_refused_scheme_is_named_without_any_of_the_url(args: list[str]) -> None:
    """Sentinel and cluster refuse other schemes naming the scheme alone (before: the URL's
    first ten characters, part of the password with them)."""
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert SECRET[:4] not in result.output and "URL" in result.output, result.output


def test_the_demo_names_its_redis_without_the_password_and_its_replicas_do_not_carry_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pyfiq.ops.demo as demo_module
    from pyfiq.config import Settings
    from pyfiq.ops.scenario_tasks import ECHO_ENV, JOURNAL_ENV

    for name in (JOURNAL_ENV, ECHO_ENV):  # Demo.create sets them; restored after the test
        monkeypatch.setenv(name, "")
    said: list[str] = []
    monkeypatch.setattr(demo_module, "say", lambda *parts, **kw: said.append(" ".join(map(str, parts))))
    demo_module.Demo.create(f"redis://app:{SECRET}@127.0.0.1:1/0", replicas=2, tasks=1).intro()
    assert said and not any(SECRET in line for line in said), said
    # On the command line of a process, any local user's ps reads the password.
    assert not any(SECRET in arg for arg in demo_module.ProcessFleet.argv(Settings(), ["q"], "r1"))

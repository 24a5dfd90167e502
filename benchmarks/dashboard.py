"""What one dashboard refresh costs Redis, by the number of streams.

    python -m benchmarks.dashboard [--streams 1000,10000,100000] [--tasks 100000] [--json out.json]

Starts its own redis-server (no persistence) on a free port, fills one keyed queue with that
many streams (one pending task each, plus dead letters on 100 of them and two small queues
beside it), and for each size measures one overview (``backend.admin.overview``, what the
dashboard's front page reads on every refresh), the first page of the queue's streams, a
search for one key among all of them, and whole refreshes of the dashboard's overview and of
the queue's page (its streams, its last hour, through the app): Redis commands run (``INFO
commandstats``), the time Redis spent in them, round trips, the wall time seen by the caller,
and the one command that took Redis longest (from the slow log, every command logged).

With ``--tasks N``, one stream of another prefix is filled with N pending tasks and the work
itself is measured: a refresh of the stream's tasks page (its first and its last page, through
the app), and the delete of a task near its tail with the place the page showed it at, then of
one without a place (looked for from the head, as far as ``STATUS_SCAN``).
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import click
import redis
import redis.client

from pyfiq import RedisQueueBackend
from pyfiq.backend.views import StreamPage
from pyfiq.engine.status import STATUS_SCAN
from pyfiq.task import TaskRecord, new_task_id
from pyfiq_harness.servers import RedisProcess

QUEUE = "fanout"
#: What is measured: the admin reads alone, then whole refreshes of the dashboard's overview and
#: of the keyed queue's page (what the page reads, through the app).
VIEWS = ("overview", "stream_page", "search", "overview_page", "queue_page")


class RoundTrips:
    """Counts requests sent to Redis: each plain command and each pipeline is one."""

    def __init__(self) -> None:
        self.count = 0
        # redis-py leaves execute_command untyped.
        self._plain: Callable[..., Any] = redis.client.Redis.execute_command
        self._pipe = redis.client.Pipeline.execute

    def __enter__(self) -> RoundTrips:
        plain, pipe = self._plain, self._pipe

        def count_plain(client: Any, *args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return plain(client, *args, **kwargs)

        def count_pipe(p: Any, *args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return pipe(p, *args, **kwargs)

        redis.client.Redis.execute_command = count_plain  # type: ignore[method-assign,assignment]
        redis.client.Pipeline.execute = count_pipe  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        redis.client.Redis.execute_command = self._plain  # type: ignore[method-assign]
        redis.client.Pipeline.execute = self._pipe  # type: ignore[method-assign]


def grow(backend: RedisQueueBackend, have: int, want: int) -> None:
    """Add streams ``have``..``want - 1`` of the keyed queue, 1,000 enqueue calls per pipeline."""
    backend.transport.lay_out(*range(backend.keys.shards))  # raw enqueue calls write no layout
    for start in range(have, want, 1000):
        calls = []
        for i in range(start, min(want, start + 1000)):
            item = (new_task_id(), 0, "0", TaskRecord("bench.deliver", [i], {}).encode(backend.settings.serializer))
            calls.append(backend.ops.enqueue(f"{QUEUE}#k-{i}", [item]))
        backend.call_many(calls)


def measure(backend: RedisQueueBackend, what: Callable[[], object]) -> dict[str, Any]:
    stats = redis.Redis(connection_pool=backend.client.connection_pool)
    # Every command into the slow log, to find the one that took Redis longest (and the
    # server's own settings back after: --redis may name a Redis that others use).
    before = stats.config_get("slowlog-*")
    stats.config_set("slowlog-log-slower-than", 0)
    stats.config_set("slowlog-max-len", 100_000)
    stats.slowlog_reset()
    stats.config_resetstat()
    with RoundTrips() as trips:
        started = time.perf_counter()
        what()
        wall = time.perf_counter() - started
    commands = stats.info("commandstats")
    logged = [e for e in stats.slowlog_get(100_000) if not _ours(e["command"])]
    for name, value in before.items():
        if name is not None and value is not None:
            stats.config_set(name, value)
    worst = max(logged, key=lambda e: int(e["duration"]), default=None)
    ran = {k: v for k, v in commands.items() if not k.startswith(("cmdstat_config", "cmdstat_info", "cmdstat_slowlog"))}
    return {
        "commands": sum(int(v["calls"]) for v in ran.values()),
        "redis_ms": round(sum(float(v["usec"]) for v in ran.values()) / 1000, 2),
        "round_trips": trips.count,
        "wall_ms": round(wall * 1000, 1),
        "worst_us": int(worst["duration"]) if worst else 0,
        "worst": _said(worst["command"]) if worst else "",
    }


def _ours(command: bytes | str) -> bool:
    return _said(command).split(" ", 1)[0].upper() in ("CONFIG", "SLOWLOG", "INFO")


def _said(command: bytes | str) -> str:
    """A slow-log entry's command, its arguments cut short."""
    text = command.decode(errors="replace") if isinstance(command, bytes) else str(command)
    return " ".join(word[:40] for word in text.split(" ")[:3])


def dashboard_pages(backend: RedisQueueBackend) -> tuple[Callable[[], object], Callable[[], object]]:
    """One refresh of the overview and of the keyed queue's page, as a browser's fetch asks for
    them: every read of the page, through the dashboard app itself."""
    from starlette.testclient import TestClient

    from pyfiq.dashboard import create_app

    client = TestClient(create_app(backend, refresh=0))
    client.get("/")  # the first request sets the form cookie: not what a refresh costs

    def page(path: str) -> Callable[[], object]:
        def get() -> object:
            response = client.get(path)
            assert response.status_code == 200, response.text[:500]
            return response

        return get

    return page("/"), page(f"/queue/{QUEUE}")


def seed(backend: RedisQueueBackend) -> None:
    """Dead letters on 100 streams (expired tasks, dead-lettered by a claim) and two small queues."""
    for i in range(100):
        stream = f"{QUEUE}#dead-{i}"
        backend.enqueue(stream, [(new_task_id(), TaskRecord("bench.deliver", [i], {}))], expires_in=0.001)
    time.sleep(0.01)
    backend.call_many([backend.ops.acquire(f"{QUEUE}#dead-{i}", 1) for i in range(100)])
    for queue in ("billing", "mail"):
        backend.enqueue(queue, [(new_task_id(), TaskRecord("bench.other", [], {})) for _ in range(5)])


def run(url: str, sizes: list[int]) -> list[dict[str, Any]]:
    backend = RedisQueueBackend(url, prefix="bench-dash", shards=16)
    seed(backend)
    rows = []
    have = 0
    for n in sizes:
        grow(backend, have, n)
        have = n
        overview = measure(backend, lambda: backend.admin.overview(blocked_after=60.0))
        page = measure(backend, lambda: backend.admin.stream_page(QUEUE))
        last = f"k-{n - 1}"
        found: list[StreamPage] = []
        search = measure(
            backend, partial(lambda key, out: out.append(backend.admin.stream_page(QUEUE, search=key)), last, found)
        )
        assert [r.stream for r in found[0].rows][:1] == [f"{QUEUE}#{last}"], "the exact key comes first"
        front, queue_page = dashboard_pages(backend)
        rows.append(
            {
                "streams": n,
                "overview": overview,
                "stream_page": page,
                "search": search,
                "overview_page": measure(backend, front),
                "queue_page": measure(backend, queue_page),
            }
        )
    backend.close()
    return rows


#: What ``--tasks`` measures.
TASK_VIEWS = ("tasks_page", "tasks_last_page", "delete_at_place", "delete_without_place")


def run_tasks(url: str, n: int) -> dict[str, Any]:
    """One stream of ``n`` pending tasks: its tasks page and the removal of one task."""
    from starlette.testclient import TestClient

    from pyfiq.dashboard import create_app

    backend = RedisQueueBackend(url, prefix="bench-tasks", shards=16)
    backend.transport.lay_out(*range(16))  # raw enqueue calls write no layout
    stream, queue = "orders#acct-1", "orders"
    ids = [new_task_id() for _ in range(n)]
    serializer = backend.settings.serializer
    for start in range(0, n, 10_000):
        calls = [
            backend.ops.enqueue(
                stream,
                [
                    (
                        ids[i],
                        0,
                        "0",
                        TaskRecord("bench.ship", [i, {"password": "x", "sku": "A-1"}], {}).encode(serializer),
                    )
                    for i in range(first, min(n, first + 1000))
                ],
            )
            for first in range(start, min(n, start + 10_000), 1000)
        ]
        backend.call_many(calls)
    client = TestClient(create_app(backend, refresh=0))
    client.get("/")  # the first request sets the form cookie: not what a refresh costs

    def page(offset: int) -> Callable[[], object]:
        def get() -> object:
            response = client.get(f"/stream/{queue}", params={"stream": stream, "offset": offset})
            assert response.status_code == 200 and ids[offset] in response.text, response.text[:500]
            return response

        return get

    def delete(i: int, place: int | None, done: bool) -> Callable[[], object]:
        def act() -> object:
            removal = backend.admin.delete_task(queue, ids[i], "acct-1", place=place)
            assert removal.done == done, removal
            return removal

        return act

    row = {
        "tasks": n,
        "tasks_page": measure(backend, page(0)),
        "tasks_last_page": measure(backend, page(max(0, n - 50))),
        "delete_at_place": measure(backend, delete(n - 10, n - 10, True)),
        "delete_without_place": measure(backend, delete(n - 20, None, n - 20 < STATUS_SCAN)),
    }
    backend.close()
    return row


@click.command()
@click.option("--streams", default="1000,10000,100000", show_default=True, help="Stream counts, ascending.")
@click.option("--redis", "url", default=None, help="Use this Redis instead of starting one (its data is added to).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the figures here.")
@click.option("--tasks", default=0, show_default=True, help="Also measure one stream of this many pending tasks.")
def main(streams: str, url: str | None, json_out: str | None, tasks: int) -> None:
    sizes = sorted(int(s) for s in streams.split(","))
    server = None
    if url is None:
        server = RedisProcess(Path(tempfile.mkdtemp(prefix="pyfiq-bench-dash-")), appendfsync=None).start()
        url = server.url
    try:
        version = redis.Redis.from_url(url).info("server")["redis_version"]
        rows = run(url, sizes)
        if tasks:
            rows.append(run_tasks(url, tasks))
    finally:
        if server is not None:
            server.stop()
    click.echo(f"python {platform.python_version()}, redis-server {version}, redis-py {redis.__version__}")
    click.echo("streams\tview\tcommands\tround trips\tRedis ms\twall ms\tworst call µs\tworst call")
    for row in rows:
        for view in VIEWS if "streams" in row else TASK_VIEWS:
            m = row[view]
            figures = [m["commands"], m["round_trips"], m["redis_ms"], m["wall_ms"], m["worst_us"], m["worst"]]
            click.echo("\t".join(map(str, [row.get("streams", f"{row.get('tasks')} tasks"), view, *figures])))
    if json_out:
        Path(json_out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

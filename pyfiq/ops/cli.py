"""The ``pyfiq`` command: the demo, a replica process, and operator tools.

The only place in pyfiq that installs signal handlers or configures logging.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import click
import redis

from .. import __version__
from ..backend.backend import RedisQueueBackend
from ..backend.connect import primary_options
from ..backend.views import QueueStatus
from ..config import Settings
from ..engine.keys import STREAM_SEPARATOR, queue_of, stream_name
from ..engine.outcomes import describe_error
from ..errors import PyfiqError
from ..logs import escape_controls
from . import render

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class OneLineFormatter(logging.Formatter):
    """Every record on one line, its control characters escaped, a traceback's line breaks too:
    task data reaches the records of other loggers (a task's own) and the text of exceptions,
    and must not start a line that passes for a record of its own."""

    def format(self, record: logging.LogRecord) -> str:
        return escape_controls(super().format(record))


def configure_logging(level: str) -> None:
    # The command is the application here, so it may configure logging: pyfiq's events go
    # through the standard library logger 'pyfiq', to stderr.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=LEVELS[level], handlers=[handler])


def show(value: Any) -> str:
    """``value`` as the CLI prints it: whatever it shows comes from Redis, where anyone who can
    enqueue (or write) put it, so no control character reaches the operator's terminal raw."""
    return escape_controls(str(value))


def json_line(row: dict[str, Any]) -> str:
    """``row`` as one JSON line: the encoder escapes every control character but DEL (it escapes
    all that is not ASCII and the C0 controls), so DEL is written as JSON's own escape."""
    return render.to_json(row).replace("\x7f", "\\u007f")


def _known(backend: RedisQueueBackend, queue: str, key: str | None = None) -> bool:
    """Whether Redis knows the queue (or its stream ``queue#key``): it has a live stream (work or
    a lease), dead letters or a pause, or, for a queue, tasks of it finished within the hour its
    per-minute counts are kept."""
    if backend.admin.streams_of(queue, key):
        return True
    paused = backend.paused()
    if key is not None:
        return stream_name(queue, key) in paused
    if any(queue_of(p) == queue for p in paused):
        return True
    pipe = backend.client.pipeline(transaction=False)
    for shard in range(backend.keys.shards):
        pipe.exists(backend.keys.counts(shard, queue))
    with backend.translated():
        return any(pipe.execute())


def _require_known(backend: RedisQueueBackend, queue: str, key: str | None = None, *, force_hint: bool = False) -> None:
    """One line and a non-zero exit for a name Redis has never seen: a typo must not look like
    an action taken (pausing nothing, listing nothing)."""
    if _known(backend, queue, key):
        return
    what = f"queue {queue!r}" if key is None else f"stream {stream_name(queue, key)!r}"
    hint = " (--force acts on it anyway)" if force_hint else ""
    raise click.ClickException(
        f"unknown {what} on {backend.address} (prefix {backend.keys.prefix!r}): Redis holds no task, lease, "
        f"dead letter or pause of it{' and saw none of it finish within the hour' if key is None else ''}; "
        f"check the name, --redis and --prefix{hint}"
    )


def _backend(url: str, prefix: str, shards: int | None, **settings: Any) -> RedisQueueBackend:
    """A backend for the deployment; without ``--shards``, the shard count the prefix is laid
    out with in Redis (a tool that guessed another count would not find every stream)."""
    if shards is None:
        probe = _connect(url, Settings(prefix=prefix))
        with probe.translated():
            stored = probe.client.get(probe.keys.layout_key)
        probe.close()
        shards = int(stored) if stored is not None else Settings.shards
    return _connect(url, Settings(prefix=prefix, shards=shards, **settings))


def _connect(url: str, settings: Settings) -> RedisQueueBackend:
    """A backend as the group-level connection options say (--cluster, --sentinel, --tls-*);
    every command that talks to Redis comes through here, so they all accept them."""
    ctx = click.get_current_context(silent=True)
    given = ctx.find_root().obj if ctx is not None else None
    conn: dict[str, Any] = given if isinstance(given, dict) else {}
    settings = settings.replace(redis_options={**settings.redis_options, **conn.get("tls", {})})
    if conn.get("sentinels"):
        # The URL gives the primary's credentials, database and TLS; Sentinel gives its address.
        primary = settings.replace(redis_options={**primary_options(url), **settings.redis_options})
        return RedisQueueBackend.from_sentinel(conn["sentinels"], conn["service"], primary)
    return RedisQueueBackend(url, settings, cluster=bool(conn.get("cluster")))


redis_option = click.option(
    "--redis",
    "url",
    default=lambda: os.environ.get("PYFIQ_REDIS_URL", "redis://localhost:6379/0"),
    show_default="$PYFIQ_REDIS_URL or redis://localhost:6379/0",
    help="Redis URL (memory:// for embedded).",
)


def backend_options(f: Any) -> Any:
    """--redis, --prefix and --shards: every replica and tool of one deployment must agree."""
    f = click.option(
        "--shards",
        default=None,
        type=click.IntRange(1, 16384),
        help="Shard count of the deployment (default: as laid out in Redis, else 16).",
    )(f)
    f = click.option("--prefix", default="pyfiq", show_default=True, help="Key prefix.")(f)
    return redis_option(f)


class _Main(click.Group):
    """Turns what an operator can fix (Redis down, a wrong password, a bad option, another
    shard layout) into one line and a non-zero exit instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            if type(exc) is not click.ClickException:
                raise  # a usage error: what the operator typed, shown with the usage
            # The commands' messages name what was asked and what Redis holds: escaped like all output.
            raise click.ClickException(show(exc.message)) from None
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except PyfiqError as exc:
            raise click.ClickException(show(exc)) from None
        except redis.RedisError as exc:
            raise click.ClickException(show(f"Redis: {describe_error(exc)}")) from None


def _defaults(group: click.Group, values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, command in group.commands.items():
        names = {p.name for p in command.params}
        if isinstance(command, click.Group):
            out[name] = _defaults(command, values)
        else:
            out[name] = {k: v for k, v in values.items() if k in names}
    return out


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--redis", "url", default=None, help="Redis URL for every command (or $PYFIQ_REDIS_URL).")
@click.option("--prefix", default=None, help="Key prefix for every command.")
@click.option("--cluster", is_flag=True, help="The Redis URL is a startup node of a Redis Cluster.")
@click.option(
    "--sentinel",
    "sentinels",
    multiple=True,
    metavar="HOST:PORT",
    help="Find the primary through this Sentinel (repeatable); the Redis URL then gives only "
    "credentials, database and TLS (rediss://).",
)
@click.option("--service", default="mymaster", show_default=True, help="Sentinel's name of the primary.")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False), help="CA certificate for rediss://.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="Client certificate (rediss://).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="Client certificate's key.")
@click.version_option(__version__, prog_name="pyfiq")
@click.pass_context
def main(ctx: click.Context, /, url: str | None, prefix: str | None, **connection: Any) -> None:
    """pyfiq: an embedded, Redis-backed, strictly ordered task queue."""
    given = {k: v for k, v in {"url": url, "prefix": prefix}.items() if v is not None}
    if given:
        ctx.default_map = _defaults(main, given)
    ctx.obj = connection_options(**connection)


def connection_options(
    cluster: bool,
    sentinels: tuple[str, ...],
    service: str,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
) -> dict[str, Any]:
    """The group-level connection options, as ``_connect`` reads them."""
    if cluster and sentinels:
        raise click.UsageError("--cluster and --sentinel exclude each other")
    files = {"ssl_ca_certs": tls_ca, "ssl_certfile": tls_cert, "ssl_keyfile": tls_key}
    return {
        "cluster": cluster,
        "sentinels": list(sentinels),
        "service": service,
        "tls": {k: v for k, v in files.items() if v is not None},
    }


@main.command()
@click.option("--redis", "url", default=None, help="Run replicas as real processes on this Redis.")
@click.option("--replicas", default=3, show_default=True, type=click.IntRange(2, 8))
@click.option("--tasks", default=12, show_default=True, type=click.IntRange(4, 200), help="Tasks per queue.")
@click.option("--log-level", type=click.Choice(list(LEVELS)), default="error", show_default=True)
def demo(url: str | None, replicas: int, tasks: int, log_level: str) -> None:
    """Several replicas share ordered queues; one is killed mid-run; a failing task is
    retried and dead-lettered; the summary checks the order from the execution journal."""
    from .demo import run_demo

    configure_logging(log_level)
    try:
        ok = run_demo(url, replicas=replicas, tasks=tasks)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(0 if ok else 1)


@main.command()
@backend_options
@click.argument("modules", nargs=-1)
@click.option("--queues", default=None, help="Comma-separated queues (default: every registered queue).")
@click.option("--import", "imports", multiple=True, help="Module defining @fifo functions (repeatable).")
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(1, 1024))
@click.option("--name", default=None, help="Replica name shown to tasks and in logs.")
@click.option("--lease-ttl", default=Settings.lease_ttl, show_default=True, type=float)
@click.option("--poll-interval", default=Settings.poll_interval, show_default=True, type=float)
@click.option("--max-deliveries", default=Settings.max_deliveries, show_default=True, type=int)
@click.option(
    "--ack-mode",
    type=click.Choice(["group", "inline"]),
    default=Settings.ack_mode,
    show_default=True,
    help="group: acknowledge in the background; inline: before taking more (see Settings.ack_mode).",
)
@click.option("--prefetch", default=None, type=int, help="Tasks taken ahead [default: 32 group, 1 inline].")
@click.option(
    "--driver",
    type=click.Choice(["threaded", "asyncio"]),
    default="threaded",
    show_default=True,
    help="Run the ThreadedWorker or the AsyncWorker.",
)
@click.option(
    "--min-replicas",
    default=Settings.min_replicas,
    show_default=True,
    type=click.IntRange(0),
    help="Durable mode: wait for this many replicas after each state change (see Settings.min_replicas).",
)
@click.option("--replica-timeout", default=Settings.replica_timeout, show_default=True, type=float)
@click.option("--log-level", type=click.Choice(list(LEVELS)), default="info", show_default=True)
def worker(
    url: str,
    prefix: str,
    shards: int,
    modules: tuple[str, ...],
    queues: str | None,
    imports: tuple[str, ...],
    concurrency: int,
    name: str | None,
    lease_ttl: float,
    poll_interval: float,
    max_deliveries: int,
    ack_mode: str,
    prefetch: int | None,
    driver: str,
    min_replicas: int,
    replica_timeout: float,
    log_level: str,
) -> None:
    """Run a worker for the @fifo functions of MODULES in the foreground until SIGINT/SIGTERM
    (graceful: running tasks finish, leases are handed over). The current directory is on the
    import path, so `pyfiq worker myapp.tasks` works from a project's root."""
    import importlib

    from ..workers.threaded import threaded_worker

    configure_logging(log_level)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for module in (*modules, *imports):
        importlib.import_module(module)
    backend = _backend(
        url,
        prefix,
        shards,
        lease_ttl=lease_ttl,
        poll_interval=poll_interval,
        max_deliveries=max_deliveries,
        ack_mode=ack_mode,
        prefetch=prefetch,
        batch_limit=max(100, prefetch or 0),
        min_replicas=min_replicas,
        replica_timeout=replica_timeout,
    )
    consumed = queues.split(",") if queues else None
    if driver == "asyncio":
        asyncio.run(_serve_async(backend, consumed, concurrency, name))
        return
    worker = threaded_worker(
        backend=backend,
        queues=consumed,
        concurrency=concurrency,
        replica=name,
    )
    done = threading.Event()

    def stop() -> None:
        worker.stop()
        done.set()

    def on_signal(signum: int, frame: Any) -> None:
        # First signal: graceful stop; a second one exits at once.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        threading.Thread(target=stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    click.echo(f"replica {show(worker.replica)} ready", err=True)
    done.wait()


async def _serve_async(
    backend: RedisQueueBackend, queues: list[str] | None, concurrency: int, name: str | None
) -> None:
    from ..workers.aio import async_worker

    worker = await async_worker(backend, queues=queues, concurrency=concurrency, replica=name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    click.echo(f"replica {show(worker.replica)} ready", err=True)
    await stop.wait()
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal exits at once
        loop.remove_signal_handler(sig)
    await worker.stop()
    await backend.aclose()


@main.group()
def dlq() -> None:
    """Inspect and act on dead-lettered tasks (of every stream of a keyed queue)."""


json_option = click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
stream_option = click.option("--stream", "key", default=None, help="Only this keyed stream of the queue.")


@dlq.command("list")
@backend_options
@click.argument("queue", required=False)
@stream_option
@click.option("--limit", default=20, show_default=True)
@json_option
def dlq_list(
    url: str, prefix: str, shards: int | None, queue: str | None, key: str | None, limit: int, as_json: bool
) -> None:
    """List dead letters of QUEUE (or which queues have any)."""
    backend = _backend(url, prefix, shards)
    if queue is None:
        counts: dict[str, int] = {}
        for stream in backend.dead_letter_streams():
            q = queue_of(stream)
            counts[q] = counts.get(q, 0) + backend.queue_info(stream)["dead"]
        for q, n in sorted(counts.items()):
            click.echo(json_line({"queue": q, "dead": n}) if as_json else f"{show(q)}\t{n}")
        return
    _require_known(backend, queue, key)
    for d in backend.admin.dead_letters_of(queue, key, limit):
        row = render.dead_letter_dict(d)
        if as_json:
            click.echo(json_line(row))
            continue
        fields = [d.task_id, d.stream, d.reason, row["name"], f"deliveries={row.get('deliveries')}"]
        fields += [f"attempts={row.get('attempts')}", f"{row.get('error_type', '')}: {row.get('error', '')}"]
        click.echo("\t".join(map(show, fields)))


@dlq.command("show")
@backend_options
@click.argument("queue")
@click.argument("task_id")
@json_option
def dlq_show(url: str, prefix: str, shards: int | None, queue: str, task_id: str, as_json: bool) -> None:
    """Show one dead letter of QUEUE, with the task's own traceback."""
    backend = _backend(url, prefix, shards)
    _require_known(backend, queue)
    found = backend.admin.find_dead_letter(queue, task_id)
    if found is None:
        raise click.ClickException(f"no dead letter {task_id} in {queue}")
    row = render.dead_letter_dict(found)
    if as_json:
        click.echo(json_line(row))
        return
    for field in ("task_id", "stream", "reason", "name", "args", "kwargs", "deliveries", "attempts", "replica"):
        click.echo(f"{field}: {show(row.get(field))}")
    click.echo(f"error: {show(row.get('error_type', ''))}: {show(row.get('error', ''))}")
    traceback = escape_controls(row["traceback"].rstrip(), keep_newlines=True)
    # Its line breaks stay, for reading; indented, no line of it passes for a field above.
    click.echo("traceback:" + ("".join(f"\n  {line}" for line in traceback.split("\n")) if traceback else " -"))


@dlq.command("requeue")
@backend_options
@click.argument("queue")
@stream_option
@click.option("--task-id", default=None, help="Requeue only this task.")
@click.option("--count", default=None, type=int, help="Requeue at most this many per stream, oldest first.")
@click.option("--front", is_flag=True, help="Put them before the stream's pending work.")
def dlq_requeue(
    url: str,
    prefix: str,
    shards: int | None,
    queue: str,
    key: str | None,
    task_id: str | None,
    count: int | None,
    front: bool,
) -> None:
    """Move dead letters of QUEUE (every stream, or --stream) back to pending."""
    backend = _backend(url, prefix, shards)
    _require_known(backend, queue, key)
    streams = [s for s in backend.admin.streams_of(queue, key) if backend.queue_info(s)["dead"]]
    if not streams:
        raise click.ClickException(f"no dead letters for {queue}{'#' + key if key else ''}")
    moved = 0
    for n, stream in enumerate(streams, 1):
        moved += backend.requeue_dead_letters(stream, count=count, task_id=task_id, front=front)
        if len(streams) > 1:
            click.echo(f"{show(stream)}: {moved} requeued so far ({n}/{len(streams)} streams)", err=True)
    if task_id is not None and moved == 0:
        raise click.ClickException(f"no dead letter {task_id} in {queue}")
    click.echo(f"requeued {moved}")


@dlq.command("purge")
@backend_options
@click.argument("queue")
@stream_option
@click.option("--yes", is_flag=True, help="Do not ask.")
def dlq_purge(url: str, prefix: str, shards: int | None, queue: str, key: str | None, yes: bool) -> None:
    """Delete the dead letters of QUEUE (every stream, or --stream)."""
    backend = _backend(url, prefix, shards)
    _require_known(backend, queue, key)
    streams = backend.admin.streams_of(queue, key)
    total = sum(backend.queue_info(s)["dead"] for s in streams)
    if total == 0:
        raise click.ClickException(f"no dead letters for {queue}{'#' + key if key else ''}")
    name = show(stream_name(queue, key))
    if not yes:
        click.confirm(f"Delete {total} dead letters of {name} ({len(streams)} streams)?", abort=True)
    click.echo(f"deleted {sum(backend.purge_dead_letters(s) for s in streams)}")


@main.command()
@backend_options
@click.argument("queue", required=False)
@click.option("--streams", "per_stream", is_flag=True, help="One line per stream.")
@json_option
@click.option("--watch", type=float, default=None, help="Refresh every this many seconds.")
def status(
    url: str, prefix: str, shards: int | None, queue: str | None, per_stream: bool, as_json: bool, watch: float | None
) -> None:
    """Queues (or one) with work, a lease or dead letters: counts, oldest task, paused, leases."""
    backend = _backend(url, prefix, shards)
    if queue is not None:
        _require_known(backend, queue)
    while True:
        _print_status(backend, queue, per_stream, as_json)
        if watch is None:
            return
        time.sleep(watch)
        click.echo("")


def _print_status(backend: RedisQueueBackend, queue: str | None, per_stream: bool, as_json: bool) -> None:
    if per_stream:
        rows: list[dict[str, Any]] = [
            backend.admin.stream_status(s).as_dict()
            for s in backend.admin.known_streams()
            if queue is None or queue_of(s) == queue
        ]
        columns = ["stream", "pending", "inflight", "dead", "oldest_age_s", "paused", "holder", "fence"]
        columns += ["lease_ms", "running_s"]
    else:
        rows = [q.as_dict() for q in backend.admin.queue_statuses(queue)]
        if queue is not None and not rows:
            # Known (paused, or it ran within the hour) but with no live stream: all zeros.
            paused = queue in backend.paused()
            rows = [QueueStatus(queue, 0, 0, 0, 0, paused, None, 0).as_dict()]
        columns = ["queue", "streams", "pending", "inflight", "dead", "oldest_age_s", "paused", "held"]
    if as_json:
        for row in rows:
            click.echo(json_line(row))
        return
    click.echo("\t".join(columns))
    for row in rows:
        click.echo("\t".join(_cell(row[c]) for c in columns))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "paused" if value else ""
    if isinstance(value, float):
        return f"{value:.1f}"
    return show(value)


@main.command()
@backend_options
@click.option("--all", "include_silent", is_flag=True, help="Also replicas not heard from lately.")
@json_option
def replicas(url: str, prefix: str, shards: int | None, include_silent: bool, as_json: bool) -> None:
    """Live workers (their heartbeats) and the streams each holds."""
    rows = _backend(url, prefix, shards).replicas(include_silent)
    if as_json:
        for row in rows:
            click.echo(json_line(row))
        return
    click.echo("replica\thost\tpid\tdriver\tconcurrency\tsilent_s\theld")
    for r in rows:
        held = ",".join(map(str, r.get("held") or [])) or "-"
        fields = [r["replica"], r.get("host"), r.get("pid"), r.get("driver"), r.get("concurrency"), r["silent_s"], held]
        click.echo("\t".join(map(show, fields)))


@main.group()
def queue() -> None:
    """Steer queues across the fleet: pause, resume, skip a blocked head."""


force_option = click.option(
    "--force", is_flag=True, help="Act even on a name Redis has never seen (say, before its first task)."
)


@queue.command("pause")
@backend_options
@click.argument("name")
@click.option("--stream", "key", default=None, help="Pause only this keyed stream of the queue.")
@force_option
def queue_pause(url: str, prefix: str, shards: int, name: str, key: str | None, force: bool) -> None:
    """Pause queue NAME everywhere: running tasks finish, nothing new starts, enqueues go on."""
    backend = _backend(url, prefix, shards)
    if not force:
        _require_known(backend, name, key, force_hint=True)
    report = backend.pause(name, key)
    # It returned once every holder confirmed it starts nothing more: say who, and fail
    # loudly if one did not answer within the lease TTL.
    click.echo(show(report.describe()))
    if not report.complete:
        sys.exit(1)


@queue.command("resume")
@backend_options
@click.argument("name")
@click.option("--stream", "key", default=None, help="Resume only this keyed stream of the queue.")
@force_option
def queue_resume(url: str, prefix: str, shards: int, name: str, key: str | None, force: bool) -> None:
    """Resume queue NAME (or one keyed stream of it)."""
    backend = _backend(url, prefix, shards)
    if not force:
        _require_known(backend, name, key, force_hint=True)
    backend.resume(name, key)
    click.echo(f"resumed {show(stream_name(name, key))}")


@queue.command("skip")
@backend_options
@click.argument("stream")
@click.option("--reason", default="skipped by an operator", show_default=True)
def queue_skip(url: str, prefix: str, shards: int, stream: str, reason: str) -> None:
    """Dead-letter the head task of STREAM (QUEUE or QUEUE#KEY) as 'operator' so it moves on."""
    backend = _backend(url, prefix, shards)
    queue, separator, key = stream.partition(STREAM_SEPARATOR)
    _require_known(backend, queue, key if separator else None)
    task_id = backend.skip(stream, reason)
    if task_id is None:
        raise click.ClickException(f"{stream} holds no task")
    click.echo(f"dead-lettered {show(task_id)} as operator")


# The exporter loads prometheus-client only when it runs: `pyfiq --help` works without the extra.
from .exporter import exporter  # noqa: E402

main.add_command(exporter)


@main.command()
@backend_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--read-only", is_flag=True, help="Show the queues; offer no action.")
@click.option(
    "--blocked-after",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds after which a running head task marks its stream blocked.",
)
def dashboard(
    url: str, prefix: str, shards: int | None, host: str, port: int, read_only: bool, blocked_after: float
) -> None:
    """Serve the web dashboard (pip install "pyfiq[dashboard]") at http://HOST:PORT/."""
    try:
        import uvicorn

        from ..dashboard import create_app

        backend = _backend(url, prefix, shards)
        app = create_app(backend, read_only=read_only, blocked_after=blocked_after)
    except ImportError as exc:
        raise click.ClickException(f'the dashboard needs its extra ({exc}): pip install "pyfiq[dashboard]"') from None
    click.echo(f"pyfiq dashboard serving http://{host}:{port}/{' (read-only)' if read_only else ''}", err=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        backend.close()

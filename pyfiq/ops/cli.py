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
from collections.abc import MutableMapping
from typing import Any

import click
import redis

from .. import __version__
from ..backend.backend import RedisQueueBackend
from ..backend.connect import primary_options
from ..config import Settings, redact_url
from ..engine.keys import queue_of, stream_name
from ..engine.outcomes import describe_error
from ..errors import PyfiqError
from ..logs import escape_controls, log
from . import render

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class OneLineFormatter(logging.Formatter):
    """Every record on one line, its control characters escaped, a traceback's line breaks too:
    task data reaches the records of other loggers (a task's own) and the text of exceptions,
    and must not start a line that passes for a record of its own."""

    def format(self, record: logging.LogRecord) -> str:
        return escape_controls(super().format(record))


def _pyfiq_fields(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A pyfiq record's own fields (``extra={"pyfiq": ...}``) as top-level keys of its JSON."""
    fields = getattr(event_dict.get("_record"), "pyfiq", None)
    if isinstance(fields, dict):
        event_dict.update(fields)
    return event_dict


def configure_logging(level: str, fmt: str = "text") -> None:
    """The command is the application here, so it may configure logging: every record (pyfiq's
    through the standard library logger 'pyfiq', and the tasks' own) to stderr, one line each,
    as readable text or, for log shippers, one JSON object per line (structlog's stdlib
    formatter: the event, its level, logger, UTC time, pyfiq's fields and any traceback)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        import structlog

        handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=[
                    structlog.stdlib.add_log_level,
                    structlog.stdlib.add_logger_name,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    _pyfiq_fields,
                ],
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer(default=str),
                ],
            )
        )
    else:
        handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=LEVELS[level], handlers=[handler], force=True)


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
            # Shard 0's layout (every count has a shard 0), else the prefix's of earlier versions.
            stored = probe.client.get(probe.keys.layout(0)) or probe.client.get(probe.keys.layout_key)
        probe.close()
        # "<count>?": a producer's tentative layout, as the enqueue script reads it.
        shards = int(stored.rstrip(b"?")) if stored is not None else Settings.shards
    return _connect(url, Settings(prefix=prefix, shards=shards, **settings))


def _connect(url: str, settings: Settings) -> RedisQueueBackend:
    """A backend as the group-level connection options say (--cluster, --sentinel, --tls-*);
    every command that talks to Redis comes through here, so they all accept them."""
    ctx = click.get_current_context(silent=True)
    given = ctx.find_root().obj if ctx is not None else None
    conn: dict[str, Any] = given if isinstance(given, dict) else {}
    settings = settings.replace(redis_options={**settings.redis_options, **conn.get("tls", {})})
    if ctx is not None:
        # Given neither on the command line (here or at the group level) nor in the environment.
        source = ctx.get_parameter_source("url")
        given = source in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.DEFAULT_MAP)
        defaulted = not given and url == DEFAULT_URL and not os.environ.get("PYFIQ_REDIS_URL")
        ctx.meta[_ASKED] = (redact_url(url), defaulted)
    if conn.get("sentinels"):
        # The URL gives the primary's credentials, database and TLS; Sentinel gives its address.
        primary = settings.replace(redis_options={**primary_options(url), **settings.redis_options})
        return RedisQueueBackend.from_sentinel(conn["sentinels"], conn["service"], primary)
    return RedisQueueBackend(url, settings, cluster=bool(conn.get("cluster")))


def _naming_the_server(ctx: click.Context, message: str) -> str:
    """An error line that says which Redis was asked (without its password), and that it was
    the default when the operator gave none: a tool pointed at the wrong server must say so."""
    asked = ctx.meta.get(_ASKED)
    if asked is None:
        return message
    address, defaulted = asked
    if address not in message:
        message = f"{message} [Redis at {address}]"
    if defaulted:
        message += f" (neither --redis nor $PYFIQ_REDIS_URL was given: {DEFAULT_URL} is the default)"
    return message


#: The Redis a command asks when given neither --redis nor $PYFIQ_REDIS_URL.
DEFAULT_URL = "redis://localhost:6379/0"
#: Where a command's ``click`` context keeps the Redis it asked (redacted), for its error line.
_ASKED = "pyfiq.asked"
#: A framework's command group (``flask pyfiq``) may put a backend factory here, in the context's
#: ``meta``, with ``_backend``'s signature: ``worker`` then builds on the app's configuration.
BACKEND_FACTORY = "pyfiq.backend_factory"


redis_option = click.option(
    "--redis",
    "url",
    default=lambda: os.environ.get("PYFIQ_REDIS_URL") or DEFAULT_URL,
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
            raise click.ClickException(show(_naming_the_server(ctx, exc.message))) from None
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except PyfiqError as exc:
            raise click.ClickException(show(_naming_the_server(ctx, str(exc)))) from None
        except redis.RedisError as exc:
            raise click.ClickException(show(_naming_the_server(ctx, f"Redis: {describe_error(exc)}"))) from None


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
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="text: readable lines; json: one JSON object per line, for log shippers.",
)
@click.option(
    "--stop-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="On SIGTERM/SIGINT, how long running tasks may take to finish before the worker exits "
    "non-zero, leaving them to run again elsewhere (match your orchestrator's grace period).",
)
@click.option(
    "--health-port",
    default=None,
    type=click.IntRange(1, 65535),
    help="Serve GET /healthz (liveness) and /readyz (readiness) on this port, for orchestrators' probes.",
)
# Every interface by default: an orchestrator probes the pod's address, not loopback.
@click.option("--health-host", default="0.0.0.0", show_default=True, help="Address the probes listen on.")  # noqa: S104
@click.option(
    "--unready-after",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="/readyz fails once Redis has not answered for this many seconds.",
)
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
    log_format: str,
    stop_timeout: float,
    health_port: int | None,
    health_host: str,
    unready_after: float,
) -> None:
    """Run a worker for the @fifo functions of MODULES in the foreground until SIGINT/SIGTERM
    (graceful: running tasks finish, leases are handed over). The current directory is on the
    import path, so `pyfiq worker myapp.tasks` works from a project's root."""
    import importlib

    from ..workers.threaded import threaded_worker

    configure_logging(log_level, log_format)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for module in (*modules, *imports):
        importlib.import_module(module)
    make_backend = click.get_current_context().meta.get(BACKEND_FACTORY, _backend)
    backend = make_backend(
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
    holder = _probes(backend, health_host, health_port, unready_after)
    if driver == "asyncio":
        sys.exit(asyncio.run(_serve_async(backend, consumed, concurrency, name, stop_timeout, holder)))
    worker = threaded_worker(backend=backend, queues=consumed, concurrency=concurrency, replica=name)
    holder.append(worker)
    _serve_threaded(worker, stop_timeout)


def _probes(backend: RedisQueueBackend, host: str, port: int | None, unready_after: float) -> list[Any]:
    """Serve the health probes when asked; returns the list the worker is put in once made."""
    holder: list[Any] = []
    if port is not None:
        from .health import Health, serve

        try:
            serve(Health(lambda: bool(holder) and holder[0].healthy, backend.ping, unready_after), host, port)
        except OSError as exc:
            raise click.ClickException(f"cannot serve the health probes on {host}:{port}: {exc}") from None
    return holder


def _serve_threaded(worker: Any, stop_timeout: float) -> None:
    """Run until a signal: the first stops gracefully within ``stop_timeout``, a second exits."""
    done, stopping, code = threading.Event(), threading.Event(), [0]

    def stop(signum: int) -> None:
        _stopping(worker, signum, stop_timeout)
        # Non-zero when tasks were left running (the worker named them in its stop_timed_out line).
        code[0] = 0 if worker.stop(stop_timeout) else 1
        done.set()

    def on_signal(signum: int, frame: Any) -> None:
        if stopping.is_set():
            _exit_now(worker, signum)
        stopping.set()
        threading.Thread(target=stop, args=(signum,), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    click.echo(f"replica {show(worker.replica)} ready", err=True)
    while not done.wait(0.5):
        if not stopping.is_set() and worker.failure is not None:
            _failed(worker)  # a thread of it died: the worker stopped itself
    if code[0]:
        _exit(code[0])  # tasks still run in their threads: they run again elsewhere


def _failed(worker: Any) -> None:
    """The worker stopped itself (a thread of it died, said as pyfiq.worker_thread_died): the
    process exits non-zero so that its supervisor restarts it, rather than idling on."""
    log.critical(
        "pyfiq.worker_process_exiting",
        replica=worker.replica,
        failure=repr(worker.failure),
        left_running=worker.running_tasks(),
    )
    _exit(1)


def _exit(code: int) -> None:
    logging.shutdown()
    os._exit(code)


def _stopping(worker: Any, signum: int, stop_timeout: float) -> None:
    log.info(
        "pyfiq.worker_stopping",
        signal=signal.Signals(signum).name,
        stop_timeout=stop_timeout,
        waits_for=worker.running_tasks(),
    )


def _exit_now(worker: Any, signum: int) -> None:
    log.warning(
        "pyfiq.worker_exiting_now",
        signal=signal.Signals(signum).name,
        left_running=worker.running_tasks(),
        then="their leases lapse and other replicas run them again",
    )
    _exit(1)


async def _serve_async(
    backend: RedisQueueBackend,
    queues: list[str] | None,
    concurrency: int,
    name: str | None,
    stop_timeout: float,
    holder: list[Any],
) -> int:
    """The asyncio driver's serve loop; returns the exit code."""
    from ..workers.aio import async_worker

    worker = await async_worker(backend, queues=queues, concurrency=concurrency, replica=name)
    holder.append(worker)
    stop, received = asyncio.Event(), [0]
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            _exit_now(worker, signum)
        received[0] = signum
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    click.echo(f"replica {show(worker.replica)} ready", err=True)
    waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(worker.join())}
    _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for wait in pending:
        wait.cancel()
    if not stop.is_set():
        if worker.failure is not None:
            _failed(worker)
        # Stopped by the application itself (its own stop(), the process living on): the
        # process still ends on a signal, as before.
        await stop.wait()
    _stopping(worker, received[0], stop_timeout)
    code = 0 if await worker.stop(stop_timeout) else 1
    if code:
        _exit(code)  # what still runs (a thread, a task that ignores cancellation) runs again elsewhere
    await backend.aclose()
    return code


# Registers the operator's commands on ``main`` (they import ``main`` from here, so this comes last).
from . import operator_cli  # noqa: E402, F401

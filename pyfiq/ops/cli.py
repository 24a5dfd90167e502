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
from typing import Any

import click

from ..config import Settings
from ..redis.backend import RedisQueueBackend

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(level: str) -> None:
    # The command is the application here, so it may configure logging: pyfiq's events go
    # through the standard library logger 'pyfiq', to stderr.
    logging.basicConfig(stream=sys.stderr, level=LEVELS[level], format="%(asctime)s %(levelname)s %(message)s")


def _backend(url: str, prefix: str, shards: int, **settings: Any) -> RedisQueueBackend:
    return RedisQueueBackend(url, Settings(prefix=prefix, shards=shards, **settings))


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
        default=Settings.shards,
        show_default=True,
        type=click.IntRange(1, 16384),
        help="Shard count of the deployment.",
    )(f)
    f = click.option("--prefix", default="pyfiq", show_default=True, help="Key prefix.")(f)
    return redis_option(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """pyfiq: an embedded, Redis-backed, strictly ordered task queue."""


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
    sys.exit(0 if run_demo(url, replicas=replicas, tasks=tasks) else 1)


@main.command()
@backend_options
@click.argument("modules", nargs=-1)
@click.option("--queues", default=None, help="Comma-separated queues (default: every registered queue).")
@click.option("--import", "imports", multiple=True, help="Module defining @fifo functions (repeatable).")
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(1, 1024))
@click.option("--name", default=None, help="Replica name shown to tasks and in logs.")
@click.option("--lease-ttl", default=10.0, show_default=True, type=float)
@click.option("--poll-interval", default=1.0, show_default=True, type=float)
@click.option("--max-deliveries", default=5, show_default=True, type=int)
@click.option("--prefetch", default=1, show_default=True, type=int)
@click.option(
    "--driver",
    type=click.Choice(["threaded", "asyncio"]),
    default="threaded",
    show_default=True,
    help="Run the ThreadedWorker or the AsyncWorker.",
)
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
    prefetch: int,
    driver: str,
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
        prefetch=prefetch,
        batch_limit=max(100, prefetch),
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
    click.echo(f"replica {worker.replica} ready", err=True)
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
    click.echo(f"replica {worker.replica} ready", err=True)
    await stop.wait()
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal exits at once
        loop.remove_signal_handler(sig)
    await worker.stop()
    await backend.aclose()


@main.group()
def dlq() -> None:
    """Inspect and act on dead-lettered tasks."""


@dlq.command("list")
@backend_options
@click.argument("queue", required=False)
@click.option("--limit", default=20, show_default=True)
def dlq_list(url: str, prefix: str, shards: int, queue: str | None, limit: int) -> None:
    """List dead letters of QUEUE (or which queues have any)."""
    backend = _backend(url, prefix, shards)
    if queue is None:
        for stream in backend.dead_letter_streams():
            click.echo(f"{stream}\t{backend.queue_info(stream)['dead']}")
        return
    for d in backend.dead_letters(queue, limit):
        name = d.record.name if d.record else d.header.get("name", "?")
        click.echo(
            f"{d.task_id}\t{d.reason}\t{name}\tdeliveries={d.header.get('deliveries')}\t"
            f"attempts={d.header.get('attempts')}\t{d.header.get('error_type', '')}: {d.header.get('error', '')}"
        )


@dlq.command("requeue")
@backend_options
@click.argument("queue")
@click.option("--task-id", default=None, help="Requeue only this task.")
@click.option("--count", default=1_000_000, help="Requeue at most this many, oldest first.")
@click.option("--front", is_flag=True, help="Put them before the queue's pending work.")
def dlq_requeue(url: str, prefix: str, shards: int, queue: str, task_id: str | None, count: int, front: bool) -> None:
    """Move dead letters of QUEUE back to its pending list."""
    moved = _backend(url, prefix, shards).requeue_dead_letters(queue, count=count, task_id=task_id, front=front)
    click.echo(f"requeued {moved}")


@dlq.command("purge")
@backend_options
@click.argument("queue")
@click.confirmation_option(prompt="Delete every dead letter of this queue?")
def dlq_purge(url: str, prefix: str, shards: int, queue: str) -> None:
    """Delete the dead letters of QUEUE."""
    click.echo(f"deleted {_backend(url, prefix, shards).purge_dead_letters(queue)}")


@main.command()
@backend_options
def status(url: str, prefix: str, shards: int) -> None:
    """Queues with work or a lease, with their counts, lease holder and paused state."""
    backend = _backend(url, prefix, shards)
    streams = sorted(set(backend.active_streams()) | set(backend.dead_letter_streams()))
    click.echo("queue\tpending\tinflight\tdead\tholder\tfence\tlease_ms\tpaused")
    for stream in streams:
        i = backend.queue_info(stream)
        click.echo(
            f"{stream}\t{i['pending']}\t{i['inflight']}\t{i['dead']}\t{i['holder'] or '-'}\t"
            f"{i['fence'] or '-'}\t{i['lease_ttl_ms'] or '-'}\t{'paused' if i['paused'] else ''}"
        )


@main.group()
def queue() -> None:
    """Steer queues across the fleet: pause, resume, skip a blocked head."""


@queue.command("pause")
@backend_options
@click.argument("name")
@click.option("--stream", "key", default=None, help="Pause only this keyed stream of the queue.")
def queue_pause(url: str, prefix: str, shards: int, name: str, key: str | None) -> None:
    """Pause queue NAME everywhere: running tasks finish, nothing new starts, enqueues go on."""
    _backend(url, prefix, shards).pause(name, key)
    click.echo(f"paused {name}{'#' + key if key else ''}")


@queue.command("resume")
@backend_options
@click.argument("name")
@click.option("--stream", "key", default=None, help="Resume only this keyed stream of the queue.")
def queue_resume(url: str, prefix: str, shards: int, name: str, key: str | None) -> None:
    """Resume queue NAME (or one keyed stream of it)."""
    _backend(url, prefix, shards).resume(name, key)
    click.echo(f"resumed {name}{'#' + key if key else ''}")


@queue.command("skip")
@backend_options
@click.argument("stream")
@click.option("--reason", default="skipped by an operator", show_default=True)
def queue_skip(url: str, prefix: str, shards: int, stream: str, reason: str) -> None:
    """Dead-letter the head task of STREAM (QUEUE or QUEUE#KEY) as 'operator' so it moves on."""
    task_id = _backend(url, prefix, shards).skip(stream, reason)
    if task_id is None:
        raise click.ClickException(f"{stream} holds no task")
    click.echo(f"dead-lettered {task_id} as operator")

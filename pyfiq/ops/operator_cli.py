"""The operator's commands of ``pyfiq``: dead letters (``dlq``), one task (``task show``, and
``task delete/dead-letter`` of a pending one), ``status``, ``replicas``, queue control
(``queue pause/resume/skip``) and the ``dashboard``. Registered on the ``main`` group
by ``pyfiq.ops.cli``, which holds the shared options and the worker."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import click

from ..backend.backend import RedisQueueBackend
from ..backend.views import QueueStatus
from ..backend.work import Removal
from ..engine.keys import STREAM_SEPARATOR, queue_of, stream_name
from ..errors import PyfiqError
from ..functions import handle
from ..logs import escape_controls
from . import render
from .cli import _backend, _require_known, backend_options, json_line, main, show


@main.group()
def dlq() -> None:
    """Inspect and act on dead-lettered tasks (of every stream of a keyed queue)."""


json_option = click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
stream_option = click.option("--stream", "key", default=None, help="Only this keyed stream of the queue (its key).")


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


@main.group()
def task() -> None:
    """What became of one task: where it waits, who runs it, why it was dead-lettered."""


@task.command("show")
@backend_options
@click.argument("queue")
@click.argument("task_id")
@click.option("--stream", "key", default=None, help="The keyed stream of QUEUE the task was enqueued on.")
@json_option
def task_show(
    url: str, prefix: str, shards: int | None, queue: str, task_id: str, key: str | None, as_json: bool
) -> None:
    """Show where task TASK_ID of QUEUE is now (one read, changing nothing)."""
    backend = _backend(url, prefix, shards)
    try:
        status = handle(task_id, queue=queue, key=key, backend=backend).status()
    except PyfiqError as exc:
        raise click.ClickException(str(exc)) from None
    hidden = ("id", "stream", "encoded_result", "searched_all", "traceback")
    row = {
        "task_id": status.id,
        "stream": status.stream,
        **{k: v for k, v in dataclasses.asdict(status).items() if k not in hidden},
    }
    for name, value in list(row.items()):
        if isinstance(value, datetime):
            row[name] = value.isoformat(timespec="milliseconds")
    if status.encoded_result is not None:
        row["result"] = render.shown_result(status.encoded_result, backend.settings.serializer)
    if as_json:
        click.echo(json_line({**row, "traceback": status.traceback}))
        return
    for name, value in row.items():
        if value is not None:
            click.echo(f"{name}: {show(value)}")
    if status.traceback:
        click.echo("traceback: (pyfiq dlq show prints it whole)")


place_option = click.option(
    "--place",
    type=click.IntRange(min=0),
    default=None,
    help="Where the task waits (as 'task show' or the dashboard says): looked at first. Without it, "
    "the first 10,000 pending tasks are looked through.",
)


@task.command("delete")
@backend_options
@click.argument("queue")
@click.argument("task_id")
@click.option("--stream", "key", default=None, help="The keyed stream of QUEUE the task waits in.")
@place_option
def task_delete(
    url: str, prefix: str, shards: int | None, queue: str, task_id: str, key: str | None, place: int | None
) -> None:
    """Delete pending task TASK_ID of QUEUE: it never runs, the tasks behind it keep their order.
    A task a worker was handed (running, or taken ahead) is refused, with nothing changed."""
    backend = _backend(url, prefix, shards)
    _removed(lambda: backend.admin.delete_task(queue, task_id, key, place=place))


@task.command("dead-letter")
@backend_options
@click.argument("queue")
@click.argument("task_id")
@click.option("--stream", "key", default=None, help="The keyed stream of QUEUE the task waits in.")
@click.option("--reason", default="moved to the dead letters by an operator", show_default=True)
@place_option
def task_dead_letter(
    url: str, prefix: str, shards: int | None, queue: str, task_id: str, key: str | None, reason: str, place: int | None
) -> None:
    """Move pending task TASK_ID of QUEUE to its dead letters (reason operator, requeued like any
    other); refused, as delete is, for a task a worker was handed."""
    backend = _backend(url, prefix, shards)
    _removed(lambda: backend.admin.dead_letter_task(queue, task_id, key, reason=reason, place=place))


def _removed(act: Callable[[], Removal]) -> None:
    try:
        removal = act()
    except PyfiqError as exc:
        raise click.ClickException(str(exc)) from None
    if not removal.done:
        raise click.ClickException(removal.detail)
    click.echo(show(removal.detail))


@dlq.command("requeue")
@backend_options
@click.argument("queue")
@stream_option
@click.option("--task-id", default=None, help="Requeue only this task.")
@click.option(
    "--count",
    default=None,
    type=click.IntRange(min=1),
    help="Requeue the COUNT oldest dead letters of the queue (across its streams, by when they died).",
)
@click.option("--per-stream", is_flag=True, help="With --count: the COUNT oldest of each stream instead.")
@click.option("--front", is_flag=True, help="Put them before the stream's pending work.")
def dlq_requeue(
    url: str,
    prefix: str,
    shards: int | None,
    queue: str,
    key: str | None,
    task_id: str | None,
    count: int | None,
    per_stream: bool,
    front: bool,
) -> None:
    """Move dead letters of QUEUE (every stream, or --stream) back to pending."""
    backend = _backend(url, prefix, shards)
    _require_known(backend, queue, key)
    streams = [s for s in backend.admin.streams_of(queue, key) if backend.queue_info(s)["dead"]]
    if not streams:
        raise click.ClickException(f"no dead letters for {queue}{'#' + key if key else ''}")
    counts: dict[str, int | None] = {s: count for s in streams}
    if count is not None and not per_stream and task_id is None:
        counts = _oldest_of_queue(backend, streams, count)
        streams = [s for s in streams if counts.get(s)]
    moved = 0
    for n, stream in enumerate(streams, 1):
        moved += backend.requeue_dead_letters(stream, count=counts[stream], task_id=task_id, front=front)
        if len(streams) > 1:
            click.echo(f"{show(stream)}: {moved} requeued so far ({n}/{len(streams)} streams)", err=True)
    if task_id is not None and moved == 0:
        raise click.ClickException(f"no dead letter {task_id} in {queue}")
    click.echo(f"requeued {moved}")


def _oldest_of_queue(backend: RedisQueueBackend, streams: list[str], count: int) -> dict[str, int | None]:
    """How many of each stream's oldest dead letters are among the ``count`` oldest of them all
    (by the time each died): each stream's dead letters are read oldest first, ``count`` at most."""
    died: list[tuple[float, str, int]] = []
    for stream in streams:
        for seq, letter in enumerate(backend.dead_letters(stream, limit=count)):
            died.append((float(letter.header.get("at_ms", 0)), stream, seq))
    taken: dict[str, int | None] = {}
    for _, stream, _seq in sorted(died)[:count]:
        taken[stream] = (taken.get(stream) or 0) + 1
    return taken


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
        columns = ["stream", "pending", "scheduled", "inflight", "dead", "oldest_age_s", "paused", "holder", "fence"]
        columns += ["lease_ms", "running_s"]
    else:
        rows = [q.as_dict() for q in backend.admin.queue_statuses(queue)]
        if queue is not None and not rows:
            # Known (paused, or it ran within the hour) but with no live stream: all zeros.
            paused = queue in backend.paused()
            rows = [QueueStatus(queue, 0, 0, 0, 0, paused, None, 0).as_dict()]
        columns = ["queue", "streams", "pending", "scheduled", "inflight", "dead", "oldest_age_s", "paused", "held"]
    if as_json:
        for row in rows:
            click.echo(json_line(row))
        return
    click.echo("\t".join(columns))
    for row in rows:
        click.echo("\t".join(_cell(row[c]) for c in columns))
    if not per_stream:
        _print_schedules(backend, queue)


def _print_schedules(backend: RedisQueueBackend, queue: str | None) -> None:
    """The periodic schedules (of ``queue``), below the queues: ``pyfiq schedules list`` says more."""
    views = [v for v in backend.admin.schedules() if queue is None or v.queue == queue]
    if not views:
        return
    click.echo("")
    click.echo("schedule\tqueue\trule\tlast_tick\tnext_tick\tstate")
    for v in views:
        state = "paused" if v.paused else "stale" if v.stale else "running"
        ticks = [t.isoformat(timespec="seconds") if t else None for t in (v.last_tick, v.next_tick)]
        click.echo("\t".join(_cell(x) for x in (v.name, v.queue, v.rule, *ticks, state)))


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
def schedules() -> None:
    """Periodic schedules (``@fifo.periodic``) across the fleet."""


@schedules.command("list")
@backend_options
@json_option
def schedules_list(url: str, prefix: str, shards: int | None, as_json: bool) -> None:
    """Each schedule: its rule, the last tick (its task, and what became of it), the next tick,
    ticks fired and skipped, whether its queue is paused, and whether it is stale (no replica
    has fired it for a minute past its next tick)."""
    backend = _backend(url, prefix, shards)
    columns = ["name", "queue", "rule", "version", "last_tick", "task_id", "task_state", "next_tick", "fired"]
    columns += ["skipped", "paused", "stale"]
    if not as_json:
        click.echo("\t".join(columns))
    for view in backend.admin.schedules():
        row = view.as_dict()
        row["task_state"] = backend.task_status(view.stream, view.task_id).state if view.task_id else None
        for name, value in list(row.items()):
            if isinstance(value, datetime):
                row[name] = value.isoformat(timespec="milliseconds")
        if as_json:
            click.echo(json_line(row))
        else:
            cells = [_cell(row[c]) for c in columns]
            cells[columns.index("stale")] = "stale" if row["stale"] else ""
            click.echo("\t".join(cells))


@schedules.command("forget")
@backend_options
@click.argument("name")
def schedules_forget(url: str, prefix: str, shards: int | None, name: str) -> None:
    """Delete schedule NAME's record: for a function removed or renamed, or a rollback to a
    lower version. A replica still running it starts afresh, from its next tick."""
    if not _backend(url, prefix, shards).admin.forget_schedule(name):
        raise click.ClickException(f"no schedule named {name!r}")
    click.echo(f"forgot schedule {show(name)}")


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
@click.argument("name")
@click.option("--stream", "key", default=None, help="The keyed stream of the queue whose head to skip.")
@click.option("--reason", default="skipped by an operator", show_default=True)
def queue_skip(url: str, prefix: str, shards: int, name: str, key: str | None, reason: str) -> None:
    """Dead-letter the head task of queue NAME (or of one keyed stream of it: --stream KEY, or
    NAME given as QUEUE#KEY) as 'operator' so it moves on."""
    backend = _backend(url, prefix, shards)
    queue, separator, named = name.partition(STREAM_SEPARATOR)
    if separator and key is not None and key != named:
        raise click.UsageError(f"{name!r} names the key {named!r} and --stream names {key!r}: give it once")
    key = named if separator else key
    stream = stream_name(queue, key)
    _require_known(backend, queue, key)
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
@click.option(
    "--auth",
    type=click.Choice(["basic", "token"]),
    default=None,
    help="Ask every request for credentials: basic reads user:password from $PYFIQ_DASHBOARD_BASIC_AUTH, "
    "token a bearer token from $PYFIQ_DASHBOARD_TOKEN. Needed to listen on anything but loopback.",
)
def dashboard(
    url: str,
    prefix: str,
    shards: int | None,
    host: str,
    port: int,
    read_only: bool,
    blocked_after: float,
    auth: str | None,
) -> None:
    """Serve the web dashboard (pip install "pyfiq[dashboard]") at http://HOST:PORT/."""
    try:
        import uvicorn

        from ..dashboard import create_app
        from ..dashboard.auth import guard_from_env, is_loopback
    except ImportError as exc:
        raise click.ClickException(f'the dashboard needs its extra ({exc}): pip install "pyfiq[dashboard]"') from None
    if auth is None and not is_loopback(host):
        # Whoever reaches the port could pause queues, skip tasks and read their arguments.
        raise click.UsageError(
            f"refusing to listen on {show(host)} without --auth: anyone who can reach it could read the queues "
            "and act on them. Use --auth basic (user:password in $PYFIQ_DASHBOARD_BASIC_AUTH) or --auth token "
            "($PYFIQ_DASHBOARD_TOKEN), or listen on 127.0.0.1 behind a proxy that authenticates."
        )
    try:
        guard = None if auth is None else guard_from_env(auth, os.environ)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    backend = _backend(url, prefix, shards)
    app = create_app(backend, read_only=read_only, blocked_after=blocked_after, guard=guard)
    said = f"{' (read-only)' if read_only else ''}{f' (--auth {auth})' if auth else ''}"
    click.echo(f"pyfiq dashboard serving http://{host}:{port}/{said}", err=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        backend.close()

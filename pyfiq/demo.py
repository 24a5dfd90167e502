"""``python -m pyfiq demo``: replicas sharing ordered queues, one killed mid-run, a failing task
retried then dead-lettered, and a summary that checks order from the execution journal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import click

from .backend import RedisQueueBackend
from .config import Settings
from .scenario import ECHO_ENV, JOURNAL_ENV, QUEUES, STEPS, check, read_journal
from .threaded import ThreadedWorker

HOLD = 0.08


def _open_runs(journal: list[dict[str, Any]]) -> list[dict[str, Any]]:
    open_: dict[tuple[Any, ...], dict[str, Any]] = {}
    for e in journal:
        key = (e["pid"], e["replica"], e["task_id"], e["attempt"])
        if e["event"] == "start":
            open_[key] = e
        else:
            open_.pop(key, None)
    return list(open_.values())


def run_demo(url: str | None, *, replicas: int = 3, tasks: int = 12) -> bool:
    embedded = url is None
    url = url or f"memory://demo-{uuid.uuid4().hex[:8]}"
    prefix = f"pyfiq-demo-{uuid.uuid4().hex[:8]}"
    settings = Settings(prefix=prefix, lease_ttl=1.5, poll_interval=0.2, max_deliveries=3, shards=4)
    queues = list(QUEUES[:3])
    journal_path = os.path.join(tempfile.mkdtemp(prefix="pyfiq-demo-"), "journal.jsonl")
    os.environ[JOURNAL_ENV] = journal_path
    os.environ[ECHO_ENV] = "1"
    failing = (queues[1], tasks // 2)

    say = click.echo
    say(click.style("pyfiq demo", bold=True))
    say(
        f"  {replicas} replicas ({'threads on the embedded memory:// Redis' if embedded else 'processes on ' + url})"
        f" share {len(queues)} ordered queues of {tasks} tasks each.\n"
        f"  One replica is killed mid-task; its queue is taken over after the lease TTL "
        f"({settings.lease_ttl}s) and the interrupted task runs again first.\n"
        f"  {failing[0]} #{failing[1]:02d} always fails: it is retried in place (the queue waits), "
        f"then dead-lettered.\n"
    )

    kill: Callable[[str], None]
    stop_all: Callable[[], None]
    names = [f"replica-{i + 1}" for i in range(replicas)]
    if embedded:
        workers = {
            name: ThreadedWorker(RedisQueueBackend(url, settings), queues=queues, concurrency=2, replica=name).start()
            for name in names
        }

        def kill(name: str) -> None:
            workers[name].abandon()

        def stop_all() -> None:
            for w in workers.values():
                w.stop(timeout=10)

    else:
        procs = {
            name: subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pyfiq",
                    "replica",
                    "--redis",
                    url,
                    "--prefix",
                    prefix,
                    "--shards",
                    str(settings.shards),
                    "--queues",
                    ",".join(queues),
                    "--name",
                    name,
                    "--concurrency",
                    "2",
                    "--lease-ttl",
                    str(settings.lease_ttl),
                    "--poll-interval",
                    str(settings.poll_interval),
                    "--max-deliveries",
                    str(settings.max_deliveries),
                    "--log-level",
                    "error",
                ],
                env=os.environ.copy(),
            )
            for name in names
        }

        def kill(name: str) -> None:
            procs[name].send_signal(signal.SIGKILL)
            procs[name].wait()

        def stop_all() -> None:
            for p in procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs.values():
                p.wait(15)

    producer = RedisQueueBackend(url, settings)
    accepted: dict[str, list[int]] = {q: [] for q in queues}
    killed = None
    try:
        for seq in range(tasks):
            for q in queues:
                fail = -1 if (q, seq) == failing else 0
                STEPS[q].send_with_options(args=(seq,), kwargs={"hold": HOLD, "fail_attempts": fail}, backend=producer)
                accepted[q].append(seq)
        say(f"enqueued {tasks * len(queues)} tasks\n")

        deadline = time.monotonic() + 30
        while killed is None and time.monotonic() < deadline:
            journal = read_journal(journal_path)
            if sum(e["event"] == "end" for e in journal) >= tasks // 2:
                running = [r for r in _open_runs(journal) if r["replica"] in names]
                if running:
                    victim = running[-1]
                    killed = victim
                    say(
                        click.style(
                            f"\n>>> killing {victim['replica']} while it runs {victim['queue']} #{victim['seq']:02d}\n",
                            fg="red",
                            bold=True,
                        )
                    )
                    kill(victim["replica"])
                    break
            time.sleep(0.01)

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            infos = [producer.queue_info(q) for q in queues]
            if all(i["pending"] == 0 and i["inflight"] == 0 for i in infos):
                break
            time.sleep(0.1)
    finally:
        stop_all()

    journal = read_journal(journal_path)
    dead = {q: [int(d.record.args[0]) for d in producer.dead_letters(q) if d.record] for q in queues}
    report = check(journal, accepted, dead)

    say(click.style("\nsummary", bold=True))
    for q in queues:
        firsts: list[int] = []
        for e in sorted(journal, key=lambda e: e["t"]):
            if e["queue"] == q and e["event"] == "start" and e["seq"] not in firsts:
                firsts.append(e["seq"])
        in_order = firsts == accepted[q][: len(firsts)]
        mark = click.style("in order", fg="green") if in_order else click.style("OUT OF ORDER", fg="red")
        say(f"  {q}: first runs {' '.join(f'{s:02d}' for s in firsts)}  {mark}")
    for q in queues:
        for d in producer.dead_letters(q):
            label = f"#{d.record.args[0]:02d}" if d.record else "?"
            say(
                f"  dead letter: {q} {label} reason={d.reason} attempts={d.header.get('attempts')} "
                f"error={d.header.get('error_type', '').rsplit('.', 1)[-1]}: {d.header.get('error')}"
            )
    rerun_ok = True
    if killed is not None:
        reruns = [
            e
            for e in journal
            if e["event"] == "start" and e["task_id"] == killed["task_id"] and e["replica"] != killed["replica"]
        ]
        rerun_ok = bool(reruns) and reruns[0]["deliveries"] >= 2
        if reruns:
            r = reruns[0]
            say(
                f"  killed task {killed['queue']} #{killed['seq']:02d} ran again on {r['replica']} "
                f"(delivery {r['deliveries']}, new fence ...{str(r['fence'])[-5:]})"
            )
    for line in report.lines():
        say(f"  {line}")
    dlq_ok = dead == {q: ([failing[1]] if q == failing[0] else []) for q in queues}
    ok = report.ok and rerun_ok and dlq_ok and killed is not None
    verdict = click.style("PASS", fg="green", bold=True) if ok else click.style("FAIL", fg="red", bold=True)
    say(f"\nverdict: {verdict}  (journal: {journal_path})")
    producer.close()
    return ok

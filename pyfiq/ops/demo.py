"""``python -m pyfiq demo``: replicas sharing ordered queues, one killed mid-run, a failing task
retried then dead-lettered, and a summary that checks order from the execution journal.

The replicas are threads on the embedded ``memory://`` Redis, or processes on ``--redis``; the
steps and the report are the same for both."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import click

from ..backend.backend import RedisQueueBackend
from ..config import Settings, redact_url
from ..workers.threaded import ThreadedWorker
from .scenario_tasks import ECHO_ENV, JOURNAL_ENV, QUEUES, STEPS, check, read_journal

HOLD = 0.08

say = click.echo


def _open_runs(journal: list[dict[str, Any]]) -> list[dict[str, Any]]:
    open_: dict[tuple[Any, ...], dict[str, Any]] = {}
    for e in journal:
        key = (e["pid"], e["replica"], e["task_id"], e["attempt"])
        if e["event"] == "start":
            open_[key] = e
        else:
            open_.pop(key, None)
    return list(open_.values())


# -- the fleet -----------------------------------------------------------------------------------


class DemoFleet(Protocol):
    """The demo's replicas, whatever runs them."""

    def kill(self, name: str) -> None:
        """End replica ``name`` at once, mid-task, leaving its leases to lapse."""

    def stop(self) -> None:
        """Stop every replica gracefully."""


class ThreadFleet:
    """Replicas as threaded workers of this process (the embedded ``memory://`` Redis)."""

    def __init__(self, url: str, settings: Settings, queues: list[str], names: list[str]) -> None:
        self.workers = {
            name: ThreadedWorker(RedisQueueBackend(url, settings), queues=queues, concurrency=2, replica=name).start()
            for name in names
        }

    def kill(self, name: str) -> None:
        self.workers[name].abandon()

    def stop(self) -> None:
        for w in self.workers.values():
            w.stop(timeout=10)


class ProcessFleet:
    """Replicas as ``python -m pyfiq worker`` processes on a real Redis."""

    def __init__(self, url: str, settings: Settings, queues: list[str], names: list[str]) -> None:
        # The URL goes in the environment, not on the command line, where any local user's
        # ``ps`` would read its password.
        env = {**os.environ, "PYFIQ_REDIS_URL": url}
        self.procs = {name: subprocess.Popen(self.argv(settings, queues, name), env=env) for name in names}

    @staticmethod
    def argv(settings: Settings, queues: list[str], name: str) -> list[str]:
        return [
            sys.executable, "-m", "pyfiq", "worker", "pyfiq.ops.scenario_tasks",
            "--prefix", settings.prefix, "--shards", str(settings.shards),
            "--queues", ",".join(queues), "--name", name, "--concurrency", "2",
            "--lease-ttl", str(settings.lease_ttl), "--poll-interval", str(settings.poll_interval),
            "--max-deliveries", str(settings.max_deliveries), "--log-level", "error",
        ]  # fmt: skip

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait()

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            p.wait(15)


#: The execution journal's file name, in a temporary directory of its own.
JOURNAL_FILE = "journal.jsonl"


# -- the demo ------------------------------------------------------------------------------------


@dataclass
class Demo:
    """One demo run: its setup, what was accepted, and the run that was killed."""

    url: str
    embedded: bool
    tasks: int
    settings: Settings
    queues: list[str]
    names: list[str]
    journal_path: str
    #: (queue, seq) of the task that always fails.
    failing: tuple[str, int]
    accepted: dict[str, list[int]]
    killed: dict[str, Any] | None = None

    @classmethod
    def create(cls, url: str | None, *, replicas: int, tasks: int) -> Demo:
        """Set the demo up. The journal's path goes into this process's environment, where the
        tasks find it, in a replica thread or in a replica process started from here."""
        queues = list(QUEUES[:3])
        demo = cls(
            url=url or f"memory://demo-{uuid.uuid4().hex[:8]}",
            embedded=url is None,
            tasks=tasks,
            settings=Settings(
                prefix=f"pyfiq-demo-{uuid.uuid4().hex[:8]}",
                lease_ttl=1.5,
                poll_interval=0.2,
                max_deliveries=3,
                shards=4,
            ),
            queues=queues,
            names=[f"replica-{i + 1}" for i in range(replicas)],
            journal_path=os.path.join(tempfile.mkdtemp(prefix="pyfiq-demo-"), JOURNAL_FILE),
            failing=(queues[1], tasks // 2),
            accepted={q: [] for q in queues},
        )
        os.environ[JOURNAL_ENV] = demo.journal_path
        os.environ[ECHO_ENV] = "1"
        return demo

    def intro(self) -> None:
        replicas = (
            "threads on the embedded memory:// Redis"
            if self.embedded
            else f"processes on {redact_url(self.url)}, key prefix {self.settings.prefix}"
        )
        say(click.style("pyfiq demo", bold=True))
        say(
            f"  {len(self.names)} replicas ({replicas})"
            f" share {len(self.queues)} ordered queues of {self.tasks} tasks each.\n"
            f"  One replica is killed mid-task; its queue is taken over after the lease TTL "
            f"({self.settings.lease_ttl}s) and the interrupted task runs again first.\n"
            f"  {self.failing[0]} #{self.failing[1]:02d} always fails: it is retried in place (the queue waits), "
            f"then dead-lettered.\n"
        )

    def start_fleet(self) -> DemoFleet:
        if self.embedded:
            return ThreadFleet(self.url, self.settings, self.queues, self.names)
        return ProcessFleet(self.url, self.settings, self.queues, self.names)

    def enqueue(self, producer: RedisQueueBackend) -> None:
        for seq in range(self.tasks):
            for q in self.queues:
                fail = -1 if (q, seq) == self.failing else 0
                STEPS[q].send_with_options(args=(seq,), kwargs={"hold": HOLD, "fail_attempts": fail}, backend=producer)
                self.accepted[q].append(seq)
        say(f"enqueued {self.tasks * len(self.queues)} tasks\n")

    def kill_one_mid_task(self, fleet: DemoFleet) -> None:
        """Once half a queue's worth of tasks has ended, kill the replica that started a task last."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            journal = read_journal(self.journal_path)
            if sum(e["event"] == "end" for e in journal) >= self.tasks // 2:
                running = [r for r in _open_runs(journal) if r["replica"] in self.names]
                if running:
                    victim = self.killed = running[-1]
                    say(
                        click.style(
                            f"\n>>> killing {victim['replica']} while it runs {victim['queue']} #{victim['seq']:02d}\n",
                            fg="red",
                            bold=True,
                        )
                    )
                    fleet.kill(victim["replica"])
                    return
            time.sleep(0.01)

    def wait_drained(self, producer: RedisQueueBackend) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            infos = [producer.queue_info(q) for q in self.queues]
            if all(i["pending"] == 0 and i["inflight"] == 0 for i in infos):
                return
            time.sleep(0.1)

    # -- the report --

    def report(self, producer: RedisQueueBackend) -> bool:
        """Print the summary and the verdict; True if order, no-loss, the re-run of the killed
        task and the dead letter all check out."""
        journal = read_journal(self.journal_path)
        dead = {q: [int(d.record.args[0]) for d in producer.dead_letters(q) if d.record] for q in self.queues}
        report = check(journal, self.accepted, dead)
        say(click.style("\nsummary", bold=True))
        self._first_runs(journal)
        self._dead_letters(producer)
        rerun_ok = self._killed_rerun(journal)
        for line in report.lines():
            say(f"  {line}")
        dlq_ok = dead == {q: ([self.failing[1]] if q == self.failing[0] else []) for q in self.queues}
        ok = report.ok and rerun_ok and dlq_ok and self.killed is not None
        verdict = click.style("PASS", fg="green", bold=True) if ok else click.style("FAIL", fg="red", bold=True)
        say(f"\nverdict: {verdict}" + ("" if ok else f"  (journal kept: {self.journal_path})"))
        return ok

    def clean_up(self, producer: RedisQueueBackend, *, keep_journal: bool) -> None:
        """Leave nothing behind: the demo's keys in a Redis it was pointed at, and its journal
        unless it is needed to look into a failure."""
        if not self.embedded:
            keys = list(producer.client.scan_iter(f"{self.settings.prefix}:*", count=1000))
            for i in range(0, len(keys), 500):
                producer.client.unlink(*keys[i : i + 500])
            say(f"deleted the demo's {len(keys)} keys under {self.settings.prefix}:")
        if not keep_journal:
            shutil.rmtree(os.path.dirname(self.journal_path), ignore_errors=True)

    def _first_runs(self, journal: list[dict[str, Any]]) -> None:
        for q in self.queues:
            firsts: list[int] = []
            for e in sorted(journal, key=lambda e: e["t"]):
                if e["queue"] == q and e["event"] == "start" and e["seq"] not in firsts:
                    firsts.append(e["seq"])
            in_order = firsts == self.accepted[q][: len(firsts)]
            mark = click.style("in order", fg="green") if in_order else click.style("OUT OF ORDER", fg="red")
            say(f"  {q}: first runs {' '.join(f'{s:02d}' for s in firsts)}  {mark}")

    def _dead_letters(self, producer: RedisQueueBackend) -> None:
        for q in self.queues:
            for d in producer.dead_letters(q):
                label = f"#{d.record.args[0]:02d}" if d.record else "?"
                say(
                    f"  dead letter: {q} {label} reason={d.reason} attempts={d.header.get('attempts')} "
                    f"error={d.header.get('error_type', '').rsplit('.', 1)[-1]}: {d.header.get('error')}"
                )

    def _killed_rerun(self, journal: list[dict[str, Any]]) -> bool:
        """Whether the killed task ran again on another replica with a raised delivery count."""
        killed = self.killed
        if killed is None:
            return True
        reruns = [
            e
            for e in journal
            if e["event"] == "start" and e["task_id"] == killed["task_id"] and e["replica"] != killed["replica"]
        ]
        if reruns:
            r = reruns[0]
            say(
                f"  killed task {killed['queue']} #{killed['seq']:02d} ran again on {r['replica']} "
                f"(delivery {r['deliveries']}, new fence ...{str(r['fence'])[-5:]})"
            )
        return bool(reruns) and reruns[0]["deliveries"] >= 2


def run_demo(url: str | None, *, replicas: int = 3, tasks: int = 12) -> bool:
    """Run the demo (threads on an embedded Redis if ``url`` is None); True if it passes its
    checks. Ctrl-C prints the summary so far, cleans up, then raises KeyboardInterrupt."""
    demo = Demo.create(url, replicas=replicas, tasks=tasks)
    demo.intro()
    fleet = demo.start_fleet()
    producer = RedisQueueBackend(demo.url, demo.settings)
    interrupted = ok = False
    try:
        try:
            demo.enqueue(producer)
            demo.kill_one_mid_task(fleet)
            demo.wait_drained(producer)
        except KeyboardInterrupt:
            interrupted = True
            say("\ninterrupted: the summary so far")
        finally:
            fleet.stop()
        ok = demo.report(producer)
    finally:
        demo.clean_up(producer, keep_journal=not ok and not interrupted)
        producer.close()
    if interrupted:
        raise KeyboardInterrupt
    return ok

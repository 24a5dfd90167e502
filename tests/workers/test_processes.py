"""Failure tests with real OS processes: replicas are ``python -m pyfiq replica`` processes
that journal every execution of ``pyfiq.ops.scenario_tasks.step``; the test process is the producer,
the fault injector (SIGKILL, SIGSTOP/SIGCONT, SIGTERM, a Redis restart, a poison task) and
the judge (``pyfiq.ops.scenario_tasks.check`` over the journal, plus the queue state in Redis).

Every process a test starts is SIGKILLed in the fixture teardown, whatever happens.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from pyfiq import RedisQueueBackend
from pyfiq.config import Settings
from pyfiq.ops.scenario_tasks import ECHO_ENV, JOURNAL_ENV, QUEUES, STEPS, check, read_journal
from tests.support.helpers import unique_prefix, wait_until

TTL = 1.5
POLL = 0.2
MAX_DELIVERIES = 3
SHARDS = 4

Event = dict[str, Any]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGKILL the replica if the test process dies, so no replica outlives a crash."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Fleet:
    """The replica processes of one deployment (one Redis URL and prefix).

    Each replica is known by its name (``replica-N``); ``spawn`` starts a new process under a
    name (replacing a dead one). Every process ever started is remembered so ``close`` can
    SIGKILL all of them; their combined stdout/stderr goes to one log file per process.
    """

    def __init__(
        self,
        url: str,
        prefix: str,
        queues: list[str],
        journal: Path,
        logdir: Path,
        *,
        lease_ttl: float,
        driver: str = "threaded",
        concurrency: int = 2,
        ack_mode: str = "group",
    ) -> None:
        self.url, self.prefix, self.queues, self.driver = url, prefix, queues, driver
        self.concurrency, self.ack_mode = concurrency, ack_mode
        self.journal, self.logdir, self.lease_ttl = journal, logdir, lease_ttl
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.every: list[subprocess.Popen[bytes]] = []
        self.log_of: dict[int, Path] = {}
        self.env = {k: v for k, v in os.environ.items() if k != ECHO_ENV}
        self.env[JOURNAL_ENV] = str(journal)
        self.env["PYTHONUNBUFFERED"] = "1"

    def argv(self, name: str) -> list[str]:
        return [
            sys.executable, "-m", "pyfiq", "worker", "pyfiq.ops.scenario_tasks",
            "--redis", self.url, "--prefix", self.prefix, "--shards", str(SHARDS),
            "--queues", ",".join(self.queues), "--name", name,
            "--lease-ttl", str(self.lease_ttl), "--poll-interval", str(POLL),
            "--max-deliveries", str(MAX_DELIVERIES), "--concurrency", str(self.concurrency), "--log-level", "warning",
            "--driver", self.driver, "--ack-mode", self.ack_mode,
        ]  # fmt: skip

    def spawn(self, name: str) -> subprocess.Popen[bytes]:
        log = self.logdir / f"{name}.{len(self.every)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                self.argv(name),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        self.procs[name] = proc
        self.every.append(proc)
        self.log_of[proc.pid] = log
        return proc

    def start(self, n: int) -> list[str]:
        names = [f"replica-{i + 1}" for i in range(n)]
        for name in names:
            self.spawn(name)
        self.wait_ready()
        return names

    def log(self, name_or_pid: str | int) -> str:
        pid = self.procs[name_or_pid].pid if isinstance(name_or_pid, str) else name_or_pid
        path = self.log_of[pid]
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    pytest.fail(f"{name} exited with {p.returncode} while starting:\n{self.log(name)}")
                if " ready" not in self.log(name):
                    return False
            return True

        wait_until(ready, timeout=timeout, interval=0.05, message="every replica printed 'ready'")

    def name_of(self, pid: int) -> str:
        for name, p in self.procs.items():
            if p.pid == pid:
                return name
        raise KeyError(pid)

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def signal(self, name: str, sig: int) -> None:
        self.procs[name].send_signal(sig)

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def close(self) -> None:
        for p in self.every:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGKILL)  # also ends a SIGSTOPped process
        for p in self.every:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)

    def diagnostics(self) -> str:
        out = []
        for p in self.every:
            tail = self.log(p.pid)[-2000:]
            out.append(f"--- pid {p.pid} rc={p.poll()} log:\n{tail}")
        return "\n".join(out)


class Deployment:
    """A fleet, its producer backend and its journal."""

    def __init__(self, fleet: Fleet, backend: RedisQueueBackend) -> None:
        self.fleet = fleet
        self.backend = backend
        self.journal = fleet.journal
        self.queues = fleet.queues

    def enqueue(self, queue: str, seqs: range | list[int], **kwargs: Any) -> list[int]:
        for seq in seqs:
            STEPS[queue].send_with_options(args=(seq,), kwargs=dict(kwargs), backend=self.backend)
        return list(seqs)

    def drained(self) -> bool:
        try:
            return all((i := self.backend.queue_info(q))["pending"] == 0 and i["inflight"] == 0 for q in self.queues)
        except (redis.ConnectionError, redis.TimeoutError):
            return False  # Redis restarting: a stale pooled connection; look again

    def wait_drained(self, timeout: float) -> None:
        try:
            wait_until(self.drained, timeout=timeout, interval=0.05, message="every queue drained")
        except BaseException:
            info = []
            for q in self.queues:
                with contextlib.suppress(Exception):
                    info.append(str(self.backend.queue_info(q)))
            print("queue state:", *info, sep="\n")
            print(self.fleet.diagnostics())
            raise

    def final_journal(self) -> list[Event]:
        """Stop every replica (SIGKILL), then read the now complete journal."""
        self.fleet.close()
        return read_journal(self.journal)


@pytest.fixture
def deploy(tmp_path: Path) -> Iterator[Any]:
    """``deploy(url, queues, replicas, lease_ttl=TTL)``: start replica processes and a producer.
    Teardown SIGKILLs every process started and closes the producer."""
    made: list[Deployment] = []

    def make(
        url: str,
        queues: list[str],
        replicas: int,
        *,
        lease_ttl: float = TTL,
        driver: str = "threaded",
        concurrency: int = 2,
        ack_mode: str = "group",
    ) -> Deployment:
        prefix = unique_prefix()
        n = len(made)
        logdir = tmp_path / f"logs{n}"
        logdir.mkdir()
        fleet = Fleet(
            url,
            prefix,
            queues,
            tmp_path / f"journal{n}.jsonl",
            logdir,
            lease_ttl=lease_ttl,
            driver=driver,
            concurrency=concurrency,
            ack_mode=ack_mode,
        )
        backend = RedisQueueBackend(
            url,
            Settings(
                prefix=prefix, shards=SHARDS, lease_ttl=lease_ttl, poll_interval=POLL, max_deliveries=MAX_DELIVERIES
            ),
        )
        d = Deployment(fleet, backend)
        made.append(d)
        fleet.start(replicas)
        return d

    try:
        yield make
    finally:
        for d in made:
            d.fleet.close()
            d.backend.close()


# -- journal helpers ---------------------------------------------------------------------------


def journal_now(path: Path) -> list[Event]:
    """The journal while replicas still write it: a last line not yet complete is skipped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in data.split(b"\n")[:-1] if line.strip()]


def open_runs(journal: list[Event]) -> list[Event]:
    """Start lines with no end/fail line of the same execution (same process, task, attempt)."""
    open_: dict[tuple[Any, ...], Event] = {}
    for e in journal:
        key = (e["pid"], e["task_id"], e["attempt"])
        if e["event"] == "start":
            open_[key] = e
        else:
            open_.pop(key, None)
    return sorted(open_.values(), key=lambda e: e["t"])


def starts(journal: list[Event], queue: str) -> list[Event]:
    return sorted((e for e in journal if e["event"] == "start" and e["queue"] == queue), key=lambda e: e["t"])


def ends(journal: list[Event], queue: str) -> list[Event]:
    return sorted((e for e in journal if e["event"] == "end" and e["queue"] == queue), key=lambda e: e["t"])


def first_runs(journal: list[Event], queue: str) -> list[int]:
    seen: list[int] = []
    for e in starts(journal, queue):
        if e["seq"] not in seen:
            seen.append(e["seq"])
    return seen


def count_ends(path: Path) -> int:
    return sum(e["event"] == "end" for e in journal_now(path))


def no_dead(d: Deployment) -> dict[str, list[int]]:
    return {q: [] for q in d.queues}


def explain(report: Any, journal: list[Event]) -> str:
    return "\n".join(
        [
            *report.lines(),
            f"unexplained overlaps: {report.overlaps_unexplained[:3]}",
            f"order violations: {report.order_violations}",
            f"lost: {report.lost}",
            f"journal lines: {len(journal)}",
        ]
    )


# -- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("driver", "ack_mode"), [("threaded", "inline"), ("asyncio", "inline"), ("threaded", "group"), ("asyncio", "group")]
)
def test_sigkill_mid_task_no_loss_order_kept_and_rerun_first(
    redis_server: Any, deploy: Any, driver: str, ack_mode: str
) -> None:
    """G3/G4: a replica SIGKILLed mid-task loses nothing; its task runs again first, elsewhere,
    with a raised delivery count, within the lease TTL plus a poll (and some CPU slack). Runs
    with threaded and with asyncio replicas. With group acknowledgements, the tasks that ended
    right before the kill (their acknowledgement not yet landed) may run again first, in order."""
    queues = list(QUEUES[:3])
    d: Deployment = deploy(redis_server.url, queues, replicas=3, driver=driver, ack_mode=ack_mode)
    accepted = {q: d.enqueue(q, range(15), hold=0.05) for q in queues}

    victims: list[Event] = []
    killed_at = 0.0
    for attempt in range(3):
        found: list[Event] = []

        def running(attempt: int = attempt, found: list[Event] = found) -> bool:
            journal = journal_now(d.journal)
            if sum(e["event"] == "end" for e in journal) < 5 + 2 * attempt:
                return False
            live = {d.fleet.pid(n) for n in d.fleet.procs if d.fleet.alive(n)}
            found[:] = [r for r in open_runs(journal) if r["pid"] in live]
            return bool(found)

        wait_until(running, timeout=20, interval=0.005, message="a replica is mid-task")
        victim_pid = found[-1]["pid"]
        name = d.fleet.name_of(victim_pid)
        killed_at = time.time()
        d.fleet.kill(name)
        # The killed process writes nothing more: its open runs now are the executions it
        # was killed in (it may also have been between two tasks of another queue).
        victims = [r for r in open_runs(journal_now(d.journal)) if r["pid"] == victim_pid]
        if victims:
            break
        d.fleet.spawn(name)  # it finished just before the kill: replace it and try again
    assert victims, "could not catch a replica mid-task in 3 tries"

    d.wait_drained(timeout=30)
    journal = d.final_journal()
    report = check(journal, accepted, no_dead(d))
    assert report.ok, explain(report, journal)
    assert not report.lost
    assert report.reexecutions >= 1
    for q in queues:
        assert d.backend.dead_letters(q) == [], f"nothing may be dead-lettered on {q}"
        assert first_runs(journal, q) == accepted[q]

    for victim in victims:
        after = [e for e in starts(journal, victim["queue"]) if e["t"] > victim["t"]]
        assert after, f"the killed task {victim['queue']} #{victim['seq']} never ran again"
        if ack_mode == "group":
            # Ended in the last moments before the kill, unacknowledged: they come first.
            ended = {e["seq"]: e["t"] for e in journal if e["event"] == "end" and e["pid"] == victim["pid"]}
            before = list(itertools.takewhile(lambda e, seq=victim["seq"]: e["seq"] != seq, after))
            assert all(killed_at - ended.get(e["seq"], 0.0) < 0.5 for e in before), before
            assert len(before) <= 2, f"{len(before)} finished tasks ran again"
            after = after[len(before) :]
        rerun = after[0]
        assert (rerun["task_id"], rerun["seq"]) == (victim["task_id"], victim["seq"]), (
            f"after the kill, {victim['queue']} ran #{rerun['seq']} before the killed #{victim['seq']}"
        )
        assert rerun["pid"] != victim["pid"]
        assert rerun["deliveries"] >= 2, rerun
        assert rerun["fence"] > victim["fence"], "the re-run must hold a newer lease"
        assert rerun["t"] > killed_at
        takeover = rerun["t"] - killed_at
        assert takeover < TTL + POLL + 3.0, f"takeover took {takeover:.2f}s"


def test_sigstop_past_lease_ttl_is_fenced(redis_server: Any, deploy: Any) -> None:
    """G2: a replica paused (SIGSTOP) past its lease TTL loses the queue to another replica;
    once resumed it cannot take, ack or dead-letter anything under its lapsed lease.

    A is resumed while B is re-running the very task A was paused in, so that task is the
    head of the in-flight list again: only the lease check stands between A's stale
    acknowledgement and the queue (an id check alone would let it through)."""
    q = QUEUES[0]
    d: Deployment = deploy(redis_server.url, [q], replicas=2)
    accepted = {q: d.enqueue(q, range(10), hold=0.3)}

    found: list[Event] = []

    def mid_task() -> bool:
        # A run that started less than half its hold ago: the stop lands well before its end.
        found[:] = [r for r in open_runs(journal_now(d.journal)) if time.time() - r["t"] < 0.15]
        return bool(found)

    wait_until(mid_task, timeout=20, interval=0.005, message="a replica is mid-task")
    a_pid = found[-1]["pid"]
    a = d.fleet.name_of(a_pid)
    (b,) = [n for n in d.fleet.procs if n != a]
    b_pid = d.fleet.pid(b)
    stopped_at = time.time()
    d.fleet.signal(a, signal.SIGSTOP)
    time.sleep(0.05)  # let the stop land; from here on A writes nothing until SIGCONT

    frozen = [e for e in journal_now(d.journal) if e["pid"] == a_pid]
    a_last = [e for e in frozen if e["event"] == "start"][-1]
    a_open = open_runs(frozen)
    old_fence = a_last["fence"]
    b_rerun: list[Event] = []

    def b_took_over() -> bool:
        b_rerun[:] = [
            e for e in journal_now(d.journal) if e["event"] == "start" and e["pid"] == b_pid and e["t"] > stopped_at
        ]
        return bool(b_rerun)

    wait_until(
        b_took_over,
        timeout=TTL + POLL + 8,
        interval=0.005,
        message="the other replica took the paused replica's queue over",
    )
    paused = time.time() - stopped_at
    # Resume A at once, while B re-runs the task A held (the sharpest moment for a stale ack).
    d.fleet.signal(a, signal.SIGCONT)
    takeover = b_rerun[0]
    assert takeover["fence"] > old_fence and takeover["deliveries"] >= 2, takeover
    if a_open:
        assert takeover["task_id"] == a_last["task_id"], "B's first task was not the one A was paused in"
    else:  # A was stopped between tasks: B re-runs the unacknowledged one, or the one taken next
        assert takeover["seq"] in (a_last["seq"], a_last["seq"] + 1), takeover
    # The lease is renewed every TTL/5, so it lapses at most TTL after the stop, at least
    # TTL - TTL/5 after it: B cannot have taken over earlier.
    assert paused > TTL * 0.8 - 0.1, f"B took A's queue after {paused:.2f}s, before A's lease could lapse"

    # A notices it was fenced (refused renewal, refused take, or dropped result) and says so.
    wait_until(
        lambda: "pyfiq.lease_lost" in d.fleet.log(a) or "pyfiq.result_dropped" in d.fleet.log(a),
        timeout=10,
        message="the resumed replica logged that it lost its lease",
    )
    if a_open:
        # The execution A was paused in finishes (side effects cannot be fenced), nothing more.
        wait_until(
            lambda: not [r for r in open_runs(journal_now(d.journal)) if r["pid"] == a_pid],
            timeout=10,
            message="the resumed replica finished the task it was paused in",
        )
    d.wait_drained(timeout=30)
    time.sleep(0.3)  # a stale holder that wrongly went on would journal a start by now
    assert d.fleet.alive(a), f"A died after SIGCONT:\n{d.fleet.log(a)}"
    b_log = d.fleet.log(b)
    journal = d.final_journal()

    a_all = [e for e in journal if e["pid"] == a_pid]
    assert a_all[: len(frozen)] == frozen
    resumed = a_all[len(frozen) :]
    stale_starts = [e for e in resumed if e["event"] == "start" and e["fence"] <= old_fence]
    b_starts = [e for e in journal if e["event"] == "start" and e["pid"] == b_pid]
    if a_open:
        assert stale_starts == [], f"A, paused mid-task, started new work under its lapsed lease: {stale_starts}"
    else:
        # Paused between taking a task and journaling its start: A may still run that one
        # task, which B had already re-run under a newer lease; it may not take anything new.
        assert len(stale_starts) <= 1, stale_starts
        for s in stale_starts:
            assert any(
                bs["task_id"] == s["task_id"] and bs["fence"] > s["fence"] and bs["t"] < s["t"] for bs in b_starts
            ), f"A started {s} under its lapsed lease and B never had it"

    # A's resumed run did not acknowledge anything: B, the holder, was never refused or
    # disturbed, and it finished (acknowledged) the task A held.
    for event in ("pyfiq.stream_failed", "pyfiq.lease_lost", "pyfiq.result_dropped"):
        assert event not in b_log, f"B was disturbed by the stale holder ({event}):\n{b_log}"
    assert any(e["event"] == "end" and e["pid"] == b_pid and e["task_id"] == takeover["task_id"] for e in journal), (
        "B did not finish the task A held"
    )

    report = check(journal, accepted, {q: []})
    assert report.ok, explain(report, journal)
    assert report.overlaps_unexplained == []
    assert not report.lost
    assert first_runs(journal, q) == accepted[q]
    assert d.backend.dead_letters(q) == [], "the paused replica dead-lettered something"
    assert d.backend.queue_info(q)["dead"] == 0


def test_redis_restart_with_aof_mid_run(own_redis: Any, deploy: Any) -> None:
    """G3: Redis restarted (gracefully, AOF everysec) under running replicas: they ride it out,
    nothing is lost and order holds."""
    queues = list(QUEUES[:2])
    d: Deployment = deploy(own_redis.url, queues, replicas=2)
    accepted = {q: d.enqueue(q, range(20), hold=0.05) for q in queues}
    wait_until(lambda: count_ends(d.journal) >= 6, timeout=20, interval=0.01, message="6 tasks ended")
    own_redis.restart(downtime=0.5)  # replicas' calls fail meanwhile: connection refused
    ended_before = count_ends(d.journal)
    assert ended_before < 40, "every task ended before the restart: nothing was exercised"

    d.wait_drained(timeout=40)
    assert all(d.fleet.alive(n) for n in d.fleet.procs), d.fleet.diagnostics()
    journal = d.final_journal()
    report = check(journal, accepted, no_dead(d))
    assert report.ok, explain(report, journal)
    assert not report.lost
    assert sum(e["event"] == "end" for e in journal) > ended_before
    for q in queues:
        assert first_runs(journal, q) == accepted[q]
        assert d.backend.dead_letters(q) == []


@pytest.mark.parametrize("ack_mode", ["inline", "group"])
def test_poison_task_dead_lettered_after_max_deliveries(redis_server: Any, deploy: Any, ack_mode: str) -> None:
    """G4: a task that kills its process on every delivery is dead-lettered as poison after
    max_deliveries, and the queue then goes on in order. With group acknowledgements the task
    is charged from its first crash if a take handed it first, else (taken ahead, unmarked) from
    its second: one delivery more, never fewer."""
    q = QUEUES[0]
    d: Deployment = deploy(redis_server.url, [q], replicas=2, ack_mode=ack_mode)
    names = list(d.fleet.procs)
    d.enqueue(q, [0], hold=0.05)
    d.enqueue(q, [1], hold=0.05, exit_deliveries=-1)
    d.enqueue(q, [2, 3, 4], hold=0.05)
    accepted = {q: [0, 1, 2, 3, 4]}

    exit_codes: list[int] = []
    deadline = time.monotonic() + 45
    while not d.drained():
        if time.monotonic() > deadline:
            print(d.fleet.diagnostics())
            pytest.fail(f"queue did not drain; {d.backend.queue_info(q)}; exits {exit_codes}")
        for name in names:
            if not d.fleet.alive(name):
                exit_codes.append(d.fleet.procs[name].returncode)
                d.fleet.spawn(name)
        time.sleep(0.05)
    journal = d.final_journal()

    dead = d.backend.dead_letters(q)
    assert len(dead) == 1, [x.header for x in dead]
    (letter,) = dead
    assert letter.reason == "poison"
    deliveries = letter.header["deliveries"]
    assert deliveries == MAX_DELIVERIES or (ack_mode == "group" and deliveries == MAX_DELIVERIES + 1)
    assert letter.record is not None and letter.record.args == [1]
    assert d.backend.queue_info(q)["dead"] == 1

    poison_starts = [e for e in starts(journal, q) if e["seq"] == 1]
    assert [e["deliveries"] for e in poison_starts] == list(range(1, deliveries + 1))
    assert len({e["pid"] for e in poison_starts}) == deliveries, "each delivery killed a different process"
    assert exit_codes.count(17) == deliveries, exit_codes
    ended = [e["seq"] for e in ends(journal, q)]
    if ack_mode == "group":  # #0's acknowledgement may not have left before #1 killed its process
        ended = [seq for i, seq in enumerate(ended) if seq != 0 or i == 0]
    assert ended == [0, 2, 3, 4]
    report = check(journal, accepted, {q: [1]})
    assert report.ok, explain(report, journal)
    assert first_runs(journal, q) == [0, 1, 2, 3, 4]


def test_graceful_stop_hands_lease_over_quickly(redis_server: Any, deploy: Any) -> None:
    """G4: SIGTERM finishes the running task, releases the lease at once (no waiting out a
    10 s TTL), and exits 0; nothing runs twice."""
    ttl = 10.0
    q = QUEUES[0]
    d: Deployment = deploy(redis_server.url, [q], replicas=2, lease_ttl=ttl)
    accepted = {q: d.enqueue(q, range(30), hold=0.1)}

    found: list[Event] = []

    def mid_task() -> bool:
        journal = journal_now(d.journal)
        # A run younger than half its hold: SIGTERM lands while the task runs, not in the
        # instant between taking a task and starting it.
        found[:] = [r for r in open_runs(journal) if time.time() - r["t"] < 0.05]
        return sum(e["event"] == "end" for e in journal) >= 2 and bool(found)

    wait_until(mid_task, timeout=20, interval=0.005, message="a replica is mid-task")
    a_pid = found[-1]["pid"]
    a = d.fleet.name_of(a_pid)
    (b,) = [n for n in d.fleet.procs if n != a]
    b_pid = d.fleet.pid(b)
    d.fleet.signal(a, signal.SIGTERM)
    try:
        rc = d.fleet.procs[a].wait(15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"A did not exit within 15 s of SIGTERM:\n{d.fleet.log(a)}")
    assert rc == 0, f"A exited with {rc}:\n{d.fleet.log(a)}"

    d.wait_drained(timeout=30)
    journal = d.final_journal()
    a_events = [e for e in journal if e["pid"] == a_pid]
    assert not [r for r in open_runs(a_events)], "A stopped without finishing its running task"
    a_last_end = [e for e in a_events if e["event"] == "end"][-1]
    nxt = [e for e in starts(journal, q) if e["t"] > a_last_end["t"]]
    assert nxt, "nothing ran after A stopped: A was stopped too late to test a hand-off"
    assert nxt[0]["pid"] == b_pid
    assert nxt[0]["seq"] == a_last_end["seq"] + 1
    gap = nxt[0]["t"] - a_last_end["t"]
    assert gap < 3.0, f"B took {gap:.2f}s to take over (lease TTL {ttl}s): no hand-off"

    report = check(journal, accepted, {q: []})
    assert report.ok, explain(report, journal)
    assert report.reexecutions == 0
    all_starts = starts(journal, q)
    assert [e["seq"] for e in all_starts] == accepted[q], "a task ran twice or out of order"
    assert all(e["deliveries"] == 1 for e in all_starts)
    assert [e["seq"] for e in ends(journal, q)] == accepted[q]
    assert d.backend.dead_letters(q) == []


def test_exclusion_across_processes(redis_server: Any, deploy: Any) -> None:
    """G2/G1: three replica processes of one stream each contend for two queues, which are fed
    in bursts so they drain and are claimed again many times; executions of one queue never
    overlap. With one stream per replica both queues are worked by different processes at once."""
    queues = list(QUEUES[:2])
    d: Deployment = deploy(redis_server.url, queues, replicas=3, concurrency=1)
    accepted: dict[str, list[int]] = {q: [] for q in queues}
    for q in queues:
        accepted[q] += d.enqueue(q, range(10), hold=0.02)
    for start in range(10, 30, 4):
        time.sleep(0.2)  # longer than a burst takes: each queue drains and is claimed again
        for q in queues:
            accepted[q] += d.enqueue(q, range(start, min(start + 4, 30)), hold=0.02)
    assert all(accepted[q] == list(range(30)) for q in queues)

    d.wait_drained(timeout=30)
    journal = d.final_journal()
    report = check(journal, accepted, no_dead(d))
    assert report.ok, explain(report, journal)
    assert report.overlaps_unexplained == []
    assert report.overlaps_explained == 0
    assert report.reexecutions == 0
    for q in queues:
        runs = starts(journal, q)
        assert [e["seq"] for e in runs] == accepted[q], f"{q}: a task ran twice or out of order"
        assert [e["seq"] for e in ends(journal, q)] == accepted[q]
        assert d.backend.dead_letters(q) == []
    pids = {e["pid"] for e in journal}
    assert len(pids) >= 2, "one process ran everything: the queues were never worked concurrently"

"""The producer side under faults: enqueues that share round trips while one caller is
cancelled (``cancel``) or interrupted by a signal handler (``interrupt``), while the process
forks (``fork``), or while durable mode's only replica stalls (``replica-stall``).

Each round runs in a child process of its own (``python -m pyfiq_harness.enqueue_drill``): it
enqueues ``(producer, seq)`` calls from several producers at once, with faults at random
moments, and journals every call's outcome. The judge then reads what Redis stored and holds
each outcome to its promise ("one caller, one outcome"):

- a handle: the task is stored exactly once, under the handle's id, never ``duplicate``
  (every call's dedup key, where it has one, is its own);
- ``EnqueueOutcomeUnknown``, ``NotReplicatedError``, a cancelled or interrupted call: stored
  at most once (``NotReplicatedError``: exactly once, it was applied);
- ``BackendUnavailableError`` otherwise: not stored;
- nothing is stored that no call made, and one producer's handles are stored in its order;
- every call ends within ``enqueue_timeout`` (plus slack), and a round that does not end at
  all (a forked child that hangs, a producer that never returns) is a breach too.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import select
import signal
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from pyfiq import RedisQueueBackend, Settings, TaskHandle, fifo
from pyfiq.errors import BackendUnavailableError, EnqueueOutcomeUnknown, NotReplicatedError
from pyfiq.task import Entry, TaskRecord

from .proxy import FaultProxy
from .servers import RedisProcess, popen
from .topologies import Replicated

FAULTS = ("cancel", "interrupt", "fork", "replica-stall")
#: Every enqueue of a round gives up within this (the drill's setting).
ENQUEUE_TIMEOUT = 2.0
#: What a call may take beyond ``ENQUEUE_TIMEOUT`` on a loaded 2-core machine.
SLACK = 3.0
#: A round that has not ended after this many seconds hangs.
ROUND_LIMIT = 60.0
QUEUE = "drill"
PREFIX = "pyfiq-enqueue-drill"


class Interrupted(BaseException):
    """What the drill's signal handler raises, like KeyboardInterrupt: not an Exception."""


# -- one round, in a child process -------------------------------------------------------------


@dataclass
class Journal:
    """Call outcomes as JSON lines, appended with one write each (a forked child shares it)."""

    path: Path
    fd: int = field(init=False)
    #: The calls journaled so far (by this process).
    done: set[tuple[str, int]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def record(
        self, producer: str, seq: int, outcome: str, elapsed: float, handle: TaskHandle[Any] | None = None
    ) -> None:
        line = {"producer": producer, "seq": seq, "outcome": outcome, "elapsed": round(elapsed, 4)}
        if handle is not None:
            line |= {"id": handle.id, "duplicate": handle.duplicate}
        os.write(self.fd, (json.dumps(line) + "\n").encode())
        self.done.add((producer, seq))


def outcome_of(exc: BaseException) -> str:
    """The journal's name for how a call ended without a handle."""
    if isinstance(exc, NotReplicatedError):
        return "not-replicated"
    if isinstance(exc, EnqueueOutcomeUnknown):
        return "unknown"
    if isinstance(exc, BackendUnavailableError):
        return "refused"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    if isinstance(exc, Interrupted):
        return "interrupted"
    return f"error:{type(exc).__name__}"


class Round:
    """The state one round shares: its backend, the drill's function, the journal."""

    def __init__(self, url: str, journal: Path, seed: int, *, durable: bool = False) -> None:
        self.rng = random.Random(seed)
        # A socket timeout shorter than WAIT's: a reply read with the socket's alone would
        # time out while WAIT still waits, and a re-send would store the task twice.
        extra: dict[str, Any] = {"min_replicas": 1, "replica_timeout": 0.5} if durable else {}
        extra["redis_options"] = {"socket_timeout": 0.3}
        self.settings = Settings(prefix=PREFIX, enqueue_timeout=ENQUEUE_TIMEOUT, **extra)
        self.backend = RedisQueueBackend(url, self.settings)
        self.fn = fifo(queue=QUEUE, name="drill.step")(_step)
        self.journal = Journal(journal)

    def dedup(self, producer: str, seq: int) -> str | None:
        # Half the producers give every call a dedup key of its own: a re-send under it is
        # safe, and it must never come back as ``duplicate``.
        return f"{producer}:{seq}" if zlib.crc32(producer.encode()) % 2 else None

    def send(self, producer: str, seq: int) -> TaskHandle[Any]:
        return self.fn.send_with_options(
            args=(producer, seq), dedup_key=self.dedup(producer, seq), backend=self.backend
        )

    async def asend(self, producer: str, seq: int) -> TaskHandle[Any]:
        return await self.fn.asend_with_options(
            args=(producer, seq), dedup_key=self.dedup(producer, seq), backend=self.backend
        )

    def call(self, producer: str, seq: int) -> None:
        """One journaled call (threads)."""
        began = time.monotonic()
        try:
            handle = self.send(producer, seq)
        except BaseException as exc:  # an Interrupted too: the producer goes on
            self.journal.record(producer, seq, outcome_of(exc), time.monotonic() - began)
            if not isinstance(exc, (Exception, Interrupted)):
                raise
        else:
            self.journal.record(producer, seq, "handle", time.monotonic() - began, handle)


def _step(producer: str, seq: int) -> None:
    """The drill's task; it is never run, only stored."""


def producer_threads(rnd: Round, names: list[str], calls: int, stop: threading.Event) -> list[threading.Thread]:
    def produce(name: str) -> None:
        for seq in range(calls):
            if stop.is_set():
                return
            rnd.call(name, seq)

    threads = [threading.Thread(target=produce, args=(n,), name=f"producer-{n}", daemon=True) for n in names]
    for t in threads:
        t.start()
    return threads


def round_cancel(rnd: Round, calls: int) -> None:
    """Eight asyncio producers; every few milliseconds one call in flight is cancelled (a
    request timeout, a client gone), wherever it is: queued, leading a round trip, reading."""

    async def main() -> None:
        in_flight: set[asyncio.Task[TaskHandle[Any]]] = set()

        async def produce(name: str) -> None:
            for seq in range(calls):
                began = time.monotonic()
                task = asyncio.ensure_future(rnd.asend(name, seq))
                in_flight.add(task)
                try:
                    handle = await task
                except BaseException as exc:
                    rnd.journal.record(name, seq, outcome_of(exc), time.monotonic() - began)
                else:
                    rnd.journal.record(name, seq, "handle", time.monotonic() - began, handle)
                finally:
                    in_flight.discard(task)

        async def canceller() -> None:
            while True:
                await asyncio.sleep(rnd.rng.uniform(0.002, 0.03))
                if in_flight:
                    rnd.rng.choice(sorted(in_flight, key=id)).cancel()

        chaos = asyncio.ensure_future(canceller())
        await asyncio.gather(*(produce(f"a{p}") for p in range(8)))
        chaos.cancel()
        await rnd.backend.aclose()

    asyncio.run(main())


def round_interrupt(rnd: Round, calls: int) -> None:
    """The main thread and five threads enqueue; a signal handler raises in the main thread at
    random moments (it leads shared round trips, waits in them, or reads their replies)."""
    armed = threading.Event()

    def interrupt(signum: int, frame: Any) -> None:
        if armed.is_set():
            raise Interrupted

    previous = signal.signal(signal.SIGUSR1, interrupt)
    stop = threading.Event()
    main = threading.get_ident()

    def ticker() -> None:
        while not stop.is_set():
            time.sleep(rnd.rng.uniform(0.002, 0.02))
            signal.pthread_kill(main, signal.SIGUSR1)

    threads = producer_threads(rnd, [f"t{p}" for p in range(5)], calls, stop)
    ticking = threading.Thread(target=ticker, daemon=True)
    ticking.start()
    try:
        for seq in range(calls):
            armed.set()
            try:
                rnd.call("main", seq)
            except Interrupted:
                # Raised after the call ended, while it was being journaled: the journal has
                # it, or its outcome was lost with the handle (then it may be stored).
                pass
            finally:
                armed.clear()
            if ("main", seq) not in rnd.journal.done:
                rnd.journal.record("main", seq, "interrupted", 0.0)
    finally:
        for t in threads:
            t.join(ROUND_LIMIT)
        stop.set()
        # No signal may come once the default action (the process's end) is back.
        ticking.join(ROUND_LIMIT)
        signal.signal(signal.SIGUSR1, previous)


def round_fork(rnd: Round, calls: int, forks: int = 6) -> None:
    """Four threads enqueue in a loop; the process forks at random moments, and each child
    enqueues three tasks and exits. A child that does not exit in time is killed: a breach."""
    stop = threading.Event()
    threads = producer_threads(rnd, [f"f{p}" for p in range(4)], calls, stop)
    for n in range(forks):
        time.sleep(rnd.rng.uniform(0.01, 0.1))
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for seq in range(3):
                    rnd.call(f"child{n}", seq)
                code = 0
            finally:
                os._exit(code)
        if not _reaped(pid, 3 * (ENQUEUE_TIMEOUT + SLACK)):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            rnd.journal.record(f"child{n}", -1, "hang", 3 * (ENQUEUE_TIMEOUT + SLACK))
    for t in threads:
        t.join(ROUND_LIMIT)


def _reaped(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return True
        select.select([], [], [], 0.01)
    return False


def round_replica_stall(rnd: Round, calls: int, replica_pid: int) -> None:
    """Durable mode with one replica asked for: four threads enqueue while the replica is
    stopped (SIGSTOP) twice for a random spell, so WAIT runs out in the middle of round trips."""
    stop = threading.Event()
    threads = producer_threads(rnd, [f"d{p}" for p in range(4)], calls, stop)
    for _ in range(2):
        time.sleep(rnd.rng.uniform(0.05, 0.3))
        os.kill(replica_pid, signal.SIGSTOP)
        try:
            time.sleep(rnd.rng.uniform(0.6, 1.5))
        finally:
            os.kill(replica_pid, signal.SIGCONT)
    for t in threads:
        t.join(ROUND_LIMIT)


def run_round(fault: str, url: str, journal: Path, seed: int, calls: int, replica_pid: int | None) -> None:
    """One round of ``fault`` against ``url`` (through a proxy that delays replies, so round
    trips overlap the faults), journaling into ``journal``."""
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    with FaultProxy(port) as proxy:
        proxy.delay(0.005, direction="replies")
        rnd = Round(proxy.url, journal, seed, durable=fault == "replica-stall")
        if fault == "cancel":
            round_cancel(rnd, calls)
        elif fault == "interrupt":
            round_interrupt(rnd, calls)
        elif fault == "fork":
            round_fork(rnd, calls)
        else:
            assert replica_pid is not None, "replica-stall needs the replica's pid"
            round_replica_stall(rnd, calls, replica_pid)
        rnd.backend.close()


# -- the judge ---------------------------------------------------------------------------------


@dataclass
class RoundVerdict:
    fault: str
    seed: int
    outcomes: Counter[str]
    breaches: list[str]

    @property
    def ok(self) -> bool:
        return not self.breaches

    def text(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        head = f"{self.fault} (seed {self.seed}): {'PASS' if self.ok else 'BREACH'}: {counts}"
        return "\n".join([head, *(f"  - {b}" for b in self.breaches[:20])])


def read_journal(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stored_calls(url: str) -> list[tuple[tuple[str, int], str]]:
    """What the drill's streams hold, in order: ((producer, seq), task id) per entry."""
    backend = RedisQueueBackend(url, Settings(prefix=PREFIX))
    try:
        raw = backend.client.lrange(backend.keys.stream(QUEUE).pending, 0, -1)
        rows = []
        for item in raw:
            entry = Entry.parse(item)
            producer, seq = TaskRecord.decode(entry.payload, backend.settings.serializer).args
            rows.append(((str(producer), int(seq)), entry.id))
        return rows
    finally:
        backend.close()


def judge(
    fault: str, seed: int, lines: list[dict[str, Any]], stored: list[tuple[tuple[str, int], str]]
) -> RoundVerdict:
    # A signal can land while a call's line is being written: the first line is the outcome.
    first: dict[tuple[str, int], dict[str, Any]] = {}
    for line in lines:
        first.setdefault((line["producer"], line["seq"]), line)
    lines = list(first.values())
    counts: Counter[tuple[str, int]] = Counter(call for call, _ in stored)
    ids = {call: task_id for call, task_id in stored}
    breaches = list(_judge_calls(lines, counts, ids))
    made = {(line["producer"], line["seq"]) for line in lines}
    breaches += [f"{call} stored but no call journaled it" for call in counts if call not in made]
    breaches += list(_judge_order(lines, stored))
    return RoundVerdict(fault, seed, Counter(line["outcome"] for line in lines), breaches)


def _judge_calls(
    lines: list[dict[str, Any]], counts: Counter[tuple[str, int]], ids: dict[tuple[str, int], str]
) -> Iterator[str]:
    bounds: dict[str, Callable[[int], bool]] = {
        "handle": lambda n: n == 1,
        "not-replicated": lambda n: n == 1,
        "unknown": lambda n: n <= 1,
        "cancelled": lambda n: n <= 1,
        "interrupted": lambda n: n <= 1,
        "refused": lambda n: n == 0,
    }
    for line in lines:
        call, outcome = (line["producer"], line["seq"]), line["outcome"]
        if outcome == "hang":
            yield f"{call[0]}: a forked child's enqueue never returned"
            continue
        bound = bounds.get(outcome)
        if bound is None:
            yield f"{call}: ended with an unexpected {outcome}"
        elif not bound(counts[call]):
            yield f"{call}: {outcome}, yet stored {counts[call]} times"
        if outcome == "handle" and (line["duplicate"] or ids.get(call) != line["id"]):
            yield f"{call}: handle {line['id']} duplicate={line['duplicate']}, stored as {ids.get(call)}"
        if outcome not in ("cancelled", "interrupted") and line["elapsed"] > ENQUEUE_TIMEOUT + SLACK:
            yield f"{call}: {outcome} after {line['elapsed']:.1f} s (enqueue_timeout {ENQUEUE_TIMEOUT} s)"


def _judge_order(lines: list[dict[str, Any]], stored: list[tuple[tuple[str, int], str]]) -> Iterator[str]:
    handled = {(line["producer"], line["seq"]) for line in lines if line["outcome"] == "handle"}
    last: dict[str, int] = {}
    for (producer, seq), _ in stored:
        if (producer, seq) not in handled:
            continue
        if seq < last.get(producer, -1):
            yield f"{producer}: #{seq} stored after #{last[producer]}"
        last[producer] = max(seq, last.get(producer, -1))


# -- the drill ---------------------------------------------------------------------------------


def run_enqueue_drill(
    run_dir: Path, *, faults: tuple[str, ...] = FAULTS, rounds: int = 1, calls: int = 60, seed: int | None = None
) -> list[RoundVerdict]:
    """``rounds`` rounds of each fault, each on a fresh Redis (a primary and a replica for
    ``replica-stall``), each judged on its own."""
    run_dir.mkdir(parents=True, exist_ok=True)
    base = random.Random(seed).randrange(1 << 30) if seed is None else seed
    verdicts = []
    for r in range(rounds):
        for fault in faults:
            verdicts.append(_one_round(run_dir / f"{fault}-{r}", fault, base + r, calls))
    return verdicts


def _one_round(directory: Path, fault: str, seed: int, calls: int) -> RoundVerdict:
    journal = directory / "calls.jsonl"
    if fault == "replica-stall":
        servers: Any = Replicated(directory / "redis").start()
        url, replica_pid = servers.url, servers.replicas[0].proc.pid
    else:
        servers = RedisProcess(directory / "redis", appendfsync=None).start()
        url, replica_pid = servers.url, None
    try:
        argv = [sys.executable, "-m", "pyfiq_harness.enqueue_drill", "--fault", fault, "--redis", url]
        argv += ["--journal", str(journal), "--seed", str(seed), "--calls", str(calls)]
        argv += ["--replica-pid", str(replica_pid)] if replica_pid else []
        with open(directory / "round.log", "wb") as log:
            child = popen(argv, stdout=log, stderr=log)
            try:
                code = child.wait(ROUND_LIMIT)
            except Exception:
                child.kill()
                child.wait()
                code = None
        verdict = judge(fault, seed, read_journal(journal), stored_calls(url))
        if code != 0:
            verdict.breaches.insert(0, f"the round ended with {code} (None: hung past {ROUND_LIMIT} s)")
        return verdict
    finally:
        servers.stop()


@click.command()
@click.option("--fault", type=click.Choice(FAULTS), required=True)
@click.option("--redis", "url", required=True)
@click.option("--journal", type=click.Path(path_type=Path), required=True)
@click.option("--seed", type=int, required=True)
@click.option("--calls", type=click.IntRange(1), required=True)
@click.option("--replica-pid", type=int, default=None)
def round_command(fault: str, url: str, journal: Path, seed: int, calls: int, replica_pid: int | None) -> None:
    """One round of the enqueue drill, in a process of its own (it forks and takes signals)."""
    run_round(fault, url, journal, seed, calls, replica_pid)


if __name__ == "__main__":
    round_command()

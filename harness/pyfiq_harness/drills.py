"""The task and operator faults: each enqueues what it needs and follows it through the
journal (vandal, async-stop, gil, skip, pause, requeue-front, stop-kill).
"""

from __future__ import annotations

import contextlib
import signal
import time
import uuid
from pathlib import Path

import redis

from pyfiq.backend.backend import REQUEUE_STEP
from pyfiq.config import GROUP_PREFETCH
from pyfiq.engine.keys import stream_name
from pyfiq.engine.scheduler import poll_owners
from pyfiq.ops.scenario_tasks import (
    step_name,
)
from pyfiq.task import TaskRecord

from .injection import InjectorBase
from .journal import Event
from .profiles import LONG_TASK_ATTEMPTS, TAKEOVER_SLACK


class TaskDrills(InjectorBase):
    """Faults that pick their own target: malformed entries in a live queue, stops with a
    short timeout, a task holding the GIL, and the operator's actions against a live holder."""

    def _vandal(self) -> None:
        """RPUSH malformed entries straight into a live queue's pending list, as a buggy or
        hostile writer would: pyfiq must dead-letter each one (``undecodable``, raw bytes kept)
        and carry on with the tasks behind them."""
        assert self.backend is not None
        queue = self._take_queue()
        try:
            self._write_vandal_entries(queue)
        finally:
            self._free_queues(queue)

    def _write_vandal_entries(self, queue: str) -> None:
        assert self.backend is not None
        record = TaskRecord(step_name(queue), [-1], {"hold": self.p.hold})
        payload = record.encode(self.backend.settings.serializer)
        tag = uuid.uuid4().hex
        entries = [
            f"vandal-{tag}".encode(),  # not an entry at all
            b"\xff\xfe\x00vandal|" + tag.encode() + b"\x80",  # not even text
            f"{uuid.uuid4().hex}|zz|0|".encode() + payload,  # an entry but for its enqueue time
        ]
        event: Event = {"kind": "vandal", "target": queue, "t": time.time(), "entries": [e.hex() for e in entries]}
        self.backend.client.rpush(self.backend.keys.stream(queue).pending, *entries)
        event["t_end"] = time.time()
        self.record(event)

    def _async_stop(self) -> None:
        """Stop an asyncio replica's worker with ``stop(timeout=0.3)`` while a plain (sync) task
        runs in one of its threads, and keep the process alive well past the task and a lease
        TTL, as an application that stops consuming but keeps serving does. The lease must not
        be handed over while that thread still runs the task."""
        hold = round(self.p.lease_ttl * 2 + 0.5, 3)
        asyncio_replicas = {n for n in self.names if self.drivers.get(n) == "asyncio"}
        for _ in range(6):  # until an asyncio replica is the one that runs it
            queue = self._take_queue()
            line = self._enqueue_task(queue, {"hold": hold})
            start = self._wait_line(line["task_id"], "start", timeout=15)
            if start is None:
                self._free_queues(queue)
                continue
            with self._lock:
                name = self.fleet.live_pids().get(start["pid"])
                if name in asyncio_replicas and name not in self.gate.busy:
                    self.gate.busy.add(name)
                    break
            self._wait_line(line["task_id"], "end", timeout=hold + 5 * self.p.lease_ttl)
            self._free_queues(queue)
        else:
            self.echo("  ! async-stop: no asyncio replica picked up the slow task; skipped")
            return
        assert name is not None
        try:
            event = self._base("async-stop", name, True)
            event |= {"queue": queue, "seq": line["seq"], "task_id": line["task_id"], "hold": hold}
            self.fleet.signal(name, signal.SIGUSR1)
            time.sleep(hold + self.p.lease_ttl)
            event["t_exit"] = time.time()
            rc, _ = self.fleet.terminate(name, timeout=max(15.0, hold * 2))
            event["rc"] = rc
            self.fleet.spawn(name)
            self.fleet.wait_ready([name])
            event["t_end"] = time.time()
            self.record(event)
        finally:
            self._release(name)
            self._free_queues(queue)

    def _gil(self) -> None:
        """Enqueue a task that holds the GIL for 2.5 lease TTLs: its replica's heartbeat cannot
        run, the lease lapses under it, and the task must end dead-lettered for outliving its
        lease, not re-run on every take-over until it counts as poison."""
        seconds = round(self.p.lease_ttl * 2.5, 3)
        queue = self._take_queue()
        try:
            line = self._enqueue_task(queue, {"gil": seconds})
            event: Event = {"kind": "gil", "target": queue, "t": time.time(), "seconds": seconds}
            event |= {"seq": line["seq"], "task_id": line["task_id"]}
            if self._wait_line(line["task_id"], "start", timeout=15) is None:
                self.echo(f"  ! gil: the task on {queue} did not start within 15 s")
            # Let the take-overs it causes play out before the next fault.
            time.sleep(seconds + self.p.lease_ttl + self.p.poll_interval)
            event["t_end"] = time.time()
            self.record(event)
        finally:
            self._free_queues(queue)

    # -- an operator's actions, and a stop that times out --

    def _skip(self) -> None:
        """Skip the head of a stream while its holder runs it, tasks it took ahead queued behind:
        the skip must dead-letter the task the holder runs, the stream must move on at once
        (the skipped execution runs on, its result no longer counts), and the tasks taken ahead
        must run once each, in order, never two at once. Every other skip lets the head end
        right after it, before the holder's next renewal, with the tasks it took ahead still in
        its hands; the others hold the head until the tasks behind it have run elsewhere."""
        assert self.backend is not None
        self._skips += 1
        early = self._skips % 2 == 1
        queue = self._take_queue()
        release = self._release_file()
        holder: str | None = None
        try:
            # One transaction: whoever claims the stream takes the tasks behind the head at once.
            head, *behind = self._enqueue_burst(queue, [{"hold": 60.0, "until": str(release)}] + [{"hold": 0.05}] * 6)
            start = self._wait_line(head["task_id"], "start", timeout=15)
            holder = self._claim(start["pid"]) if start else None
            if start is None or holder is None:
                self.echo(f"  ! skip: the head on {queue} did not start on a replica free of other faults; skipped")
                return
            # Its renewals name the task it runs, which is what a skip dead-letters.
            time.sleep(2 * self.p.lease_ttl / 5 + 0.1)
            event: Event = {"kind": "skip", "target": queue, "holder": holder, "pid": start["pid"]}
            event |= {"head_task_id": head["task_id"], "head_seq": head["seq"]}
            event["behind"] = [line["task_id"] for line in behind]
            with self._operator() as operator:
                event["t"] = time.time()
                event["skipped_task_id"] = operator.skip(queue, "scenario skip drill")
                event["t_returned"] = time.time()
            if early:
                time.sleep(self.rng.uniform(0.0, self.p.lease_ttl / 10))
            else:
                # Had the holder waited for the head to end (or for its lease to lapse), the
                # tasks behind would wait this long: the checker sees it.
                deadline = time.monotonic() + self.p.lease_ttl + self.p.poll_interval + TAKEOVER_SLACK
                for line in behind:
                    self._wait_line(line["task_id"], "end", max(0.0, deadline - time.monotonic()))
            event["t_release"] = time.time()
            release.touch()
            for line in behind:
                self._wait_line(line["task_id"], "end", timeout=15)
            self._wait_line(head["task_id"], "end", timeout=5)
            event["t_end"] = time.time()
            self.record(event)
        finally:
            release.touch()
            if holder is not None:
                self._release(holder)
            self._free_queues(queue)

    def _pause(self) -> None:
        """Pause a queue whose holder runs a burst of tasks, some taken ahead; resume it later.
        From the moment ``pause()`` returned until the resume, no task of the queue may start
        anywhere: what the holder took ahead goes back to the stream, in order."""
        assert self.backend is not None
        queue = self._take_queue()
        try:
            burst = self._enqueue_burst(queue, [{"hold": 0.15}] * 8)
            start = self._wait_line(burst[0]["task_id"], "start", timeout=15)
            event: Event = {"kind": "pause", "target": queue}
            if start is not None:
                event |= {"holder": start["replica"], "pid": start["pid"]}
            with self._operator() as operator:
                event["t"] = time.time()
                report = operator.pause(queue)
                event["t_returned"] = time.time()
                event |= {"confirmed": report.confirmed, "ended": report.ended, "unconfirmed": report.unconfirmed}
                # Several of the burst's tasks' time: one taken ahead and not handed back would
                # start meanwhile.
                time.sleep(max(1.0, self.p.lease_ttl))
                event["t_resume"] = time.time()
                operator.resume(queue)
            for line in burst:
                self._wait_line(line["task_id"], "end", timeout=15)
            event["t_end"] = time.time()
            self.record(event)
        finally:
            with contextlib.suppress(redis.RedisError), self._operator() as operator:
                operator.resume(queue)  # never leave the queue paused
            self._free_queues(queue)

    def _requeue_front(self) -> None:
        """Fill a fresh keyed stream's dead letters, then requeue them to the front while its
        holder runs a backlog, some of it taken ahead: they must run again in their original
        order, all before the backlog that was still pending. Every other requeue moves more
        than one page (``REQUEUE_STEP``), which halts the stream while it moves them."""
        assert self.backend is not None
        self._requeues += 1
        count = self.rng.randint(5, 20) + (REQUEUE_STEP if self._requeues % 2 == 0 else 0)
        queue = self._take_queue()
        stream = stream_name(queue, f"requeue-{uuid.uuid4().hex[:8]}")
        self.streams.append(stream)
        succeed = self.path.parent / f"succeed-{uuid.uuid4().hex[:8]}"
        try:
            failing = self._enqueue_burst(stream, [{"fail_unless": str(succeed)}] * count, fragile=True)
            deadline = time.monotonic() + 30 + count * 0.05
            while (dead := int(self.backend.queue_info(stream)["dead"])) < count:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {dead} of the {count} failing tasks on {stream} were dead-lettered")
                time.sleep(0.05)
            succeed.touch()
            # More than any holder takes ahead, so that some of it is still pending at the
            # requeue; short tasks, so that the holder takes more all the while.
            backlog = self._enqueue_burst(stream, [{"hold": 0.002}] * (4 * GROUP_PREFETCH))
            if self._wait_line(backlog[0]["task_id"], "start", timeout=15) is None:
                raise RuntimeError(f"the backlog on {stream} did not start within 15 s")
            event: Event = {"kind": "requeue-front", "target": stream, "count": count}
            event["task_ids"] = [line["task_id"] for line in failing]
            with self._operator() as operator:
                event["t"] = time.time()
                event["moved"] = operator.requeue_dead_letters(stream, front=True)
                event["t_returned"] = time.time()
            for line in [*failing, *backlog]:
                self._wait_line(line["task_id"], "end", timeout=max(0.0, event["t_returned"] + 30 - time.time()))
            event["t_end"] = time.time()
            self.record(event)
        finally:
            succeed.touch()
            self._free_queues(queue)

    def _stop_kill(self) -> None:
        """Stop one replica's worker with ``stop(timeout=STOP_DRILL_TIMEOUT)`` while a long task
        runs (the process lives on, renewing that task's lease, dispatching nothing), then
        SIGKILL another replica mid-task on a queue whose shard the stopped one polled: that
        queue must still be taken over within the lease TTL plus a poll interval (plus slack)."""
        assert self.backend is not None
        holds: list[Path] = []
        queues: list[str] = []
        claimed: list[str] = []
        try:
            found = self._long_task_on_a_poller(holds, queues, claimed)
            if found is None:
                self.echo("  ! stop-kill: no replica free of other faults picked up the long task; skipped")
                return
            stopped, long_line, polled, attempts = found
            hold_long = holds[-1]
            stop: Event = {"replica": stopped, "pid": self.fleet.procs[stopped].pid, "t": time.time()}
            stop |= {"queue": long_line["queue"], "seq": long_line["seq"], "task_id": long_line["task_id"]}
            self.fleet.signal(stopped, signal.SIGUSR1)
            said = self._wait_log(stop["pid"], f"stop_drill replica={stopped} ", timeout=5)
            stop |= {"t_stopped": time.time(), "clean": None if said is None else "clean=True" in said}
            try:
                queue = self._take_queue(polled, wait=1.0) if polled else self._take_queue()
            except RuntimeError:  # taken meanwhile by a fault of the other lane
                queue = self._take_queue()
            queues.append(queue)
            victim = self._victim_task(queue, stopped, holds, claimed)
            if victim is None:
                raise RuntimeError(f"no replica but the stopped one ran the victim's task on {queue}")
            name, line = victim
            event = self._base("stop-kill", name, True)
            event |= {"queue": queue, "seq": line["seq"], "task_id": line["task_id"]}
            event |= {"polled_by_stopped": queue in polled, "attempts": attempts, "stopped": stop}
            bound = self.p.lease_ttl + self.p.poll_interval + TAKEOVER_SLACK
            # Every enqueue wakes the idle replicas to look at its shard, which finds a lapsed
            # lease whoever polls the shard: only a quiet shard shows one that nobody polls.
            # The killed replica starts again only after the take-over, since a fresh replica
            # looks at every shard until it has a view of the pollers.
            with self._producers_still():
                self.fleet.kill(name)
                event["t"] = time.time()  # the moment it was certainly dead
                timeout = max(0.0, event["t"] + bound + 1 - time.time())
                again = self._wait_line(line["task_id"], "start", timeout, after=1)
            event["takeover_s"] = None if again is None else round(again["t"] - event["t"], 3)
            self.fleet.spawn(name)
            self.fleet.wait_ready([name])
            holds[-1].touch()
            # The long task ends, the stopped worker hands its queue over; the process lives on
            # for a while, as an application that stopped consuming would.
            hold_long.touch()
            self._wait_line(long_line["task_id"], "end", timeout=5)
            time.sleep(self.p.lease_ttl)
            stop["t_exit"] = time.time()
            stop["rc"], _ = self.fleet.terminate(stopped, timeout=15)
            self.fleet.spawn(stopped)
            self.fleet.wait_ready([stopped])
            event["t_end"] = time.time()
            self.record(event)
        finally:
            for hold in holds:
                hold.touch()
            for name in claimed:
                self._release(name)
            self._free_queues(*queues)

    def _long_task_on_a_poller(
        self, holds: list[Path], queues: list[str], claimed: list[str]
    ) -> tuple[str, Event, list[str], int] | None:
        """A long task (held until the last of ``holds`` exists) running on a replica free of
        other faults, preferably one whose share of the safety poll covers a free queue:
        (replica, the task's acceptance, the free queues on the shards it polls, attempts).
        Which replica claims a task is the fleet's choice, so it tries up to LONG_TASK_ATTEMPTS
        times; what it takes goes to ``holds``, ``queues`` and ``claimed``."""
        assert self.backend is not None
        # Long tasks that went to a replica with no share are left running a while: with both
        # its slots full, the next one goes to another replica.
        parked: list[tuple[Path, Event, str]] = []
        try:
            for attempt in range(LONG_TASK_ATTEMPTS):
                if len(parked) > 2:
                    self._unpark(parked)
                hold, queue = self._release_file(), self._take_queue()
                line = self._enqueue_task(queue, {"hold": 60.0, "until": str(hold)})
                start = self._wait_line(line["task_id"], "start", timeout=15)
                name = self._claim(start["pid"]) if start else None
                if name is not None:
                    shards = self._poll_share(name)
                    mine = {q for _, _, q in parked}
                    with self._lock:
                        free = [q for q in self.queues if q not in self.queues_busy or q in mine]
                    polled = [q for q in free if self.backend.keys.stream(q).shard in shards]
                    if polled or attempt == LONG_TASK_ATTEMPTS - 1:
                        holds.append(hold)
                        queues.append(queue)
                        claimed.append(name)
                        return name, line, polled, attempt + 1
                    self._release(name)
                parked.append((hold, line, queue))
            return None
        finally:
            self._unpark(parked)

    def _unpark(self, parked: list[tuple[Path, Event, str]]) -> None:
        """End the long tasks of ``parked`` (hold file, acceptance, queue) and free their queues."""
        for hold, _, _ in parked:
            hold.touch()
        for _, line, queue in parked:
            self._wait_line(line["task_id"], "end", timeout=5)
            self._free_queues(queue)
        parked.clear()

    def _poll_share(self, name: str) -> set[int]:
        """The shards replica ``name`` would poll among the replicas that Redis lists as pollers
        now: what nobody else polls as long as the fleet counts it among them."""
        assert self.backend is not None
        members = self.backend.client.zrange(self.backend.keys.pollers, 0, -1)
        pollers = {m.decode().partition("|")[2] for m in members} | {name}
        owners = poll_owners(sorted(pollers), self.backend.keys.shards)
        return {shard for shard, owner in enumerate(owners) if owner == name}

    def _victim_task(self, queue: str, stopped: str, holds: list[Path], claimed: list[str]) -> tuple[str, Event] | None:
        """A long task on ``queue`` (held until the last of ``holds`` exists) running on a
        replica other than ``stopped`` and free of other faults: (that replica, the task's
        acceptance)."""
        for _ in range(3):
            holds.append(self._release_file())
            line = self._enqueue_task(queue, {"hold": 60.0, "until": str(holds[-1])})
            start = self._wait_line(line["task_id"], "start", timeout=15)
            name = self._claim(start["pid"]) if start else None
            if name is not None and name != stopped:
                claimed.append(name)
                return name, line
            if name is not None:
                self._release(name)
            holds[-1].touch()
            if start is not None:
                self._wait_line(line["task_id"], "end", timeout=5)
        return None

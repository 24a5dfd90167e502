"""The checkers of the task and operator drills: skips, pauses, requeues to the front,
stop-kills, vandal entries, GIL holds, replica exits and the drain.
"""

from __future__ import annotations

from pyfiq.backend.backend import REQUEUE_STEP
from pyfiq.backend.halts import MARGIN_SECONDS as PAUSE_MARGIN
from pyfiq.config import GROUP_PREFETCH
from pyfiq.engine.keys import queue_of

from .checkers import _faulted
from .facts import Finding, RunFacts
from .journal import Event, _max
from .profiles import EXPLAINING_FAULTS, TAKEOVER_SLACK


def check_skips(run: RunFacts) -> Finding:
    """An operator's skip of a stream's head while its holder runs it, tasks it took ahead
    queued behind (docs/guarantees.md "Operator actions and work taken ahead"): the skip dead-letters the
    task the holder runs, not one it finished; the stream moves on at once (the holder lets go
    as soon as it hears, it does not wait out its lease); and from the skip on no two runs of
    the stream overlap, but for the skipped execution, which may run on and no longer counts.
    A higher fencing token excuses no overlap here: only a fault on the earlier run's replica."""
    skips = [f for f in run.faults if f["kind"] == "skip"]
    finding = Finding()
    moves: list[float] = []
    overlaps: list[tuple[Event, Event, Event]] = []
    for f in skips:
        q = f["target"]
        head = f"#{f['head_seq']} ({f['head_task_id']})"
        if f.get("skipped_task_id") != f["head_task_id"]:
            finding.breaches.append(
                f"{q}: the skip dead-lettered {f.get('skipped_task_id')!r}, not the head {head} its holder "
                f"{f['holder']} was running"
            )
        elif run.dead_letters is not None and not any(
            d["queue"] == q and d.get("seq") == f["head_seq"] and d["reason"] == "operator" for d in run.dead_letters
        ):
            finding.breaches.append(f"{q}: the skipped head {head} is not in the dead letters as 'operator'")
        runs = [e for e in run.executions.starts_by_queue[q] if (e["pid"], e["task_id"]) not in run.voided]
        after = [e for e in runs if e["t"] >= f["t"]]
        if after:
            moves.append(after[0]["t"] - f["t"])
            # Only a fault that can slow a claim down (a lost replica, Redis) excuses a wait.
            quiet = not any(
                g["kind"] in EXPLAINING_FAULTS and run.window(g)[0] <= after[0]["t"] <= run.window(g)[1]
                for g in run.causes
            )
            if quiet and moves[-1] > run.lease_ttl + run.poll_interval:
                finding.breaches.append(
                    f"{q}: the first task after the skip started {moves[-1]:.2f}s after it, although its holder "
                    f"{f['holder']} was running the skipped head itself and should have let go at once"
                )
        overlaps += _overlaps_since(run, runs, f)
    if overlaps:
        f, a, b = overlaps[0]
        finding.breaches.append(
            f"{len(overlaps)} overlapping runs of a stream after a skip, e.g. {a['queue']} #{a['seq']} on "
            f"{a['replica']} (fence {a['fence']}) still ran when #{b['seq']} started on {b['replica']} (fence "
            f"{b['fence']}) {b['t'] - f['t']:.3f}s after the skip of {f['target']}"
        )
    finding.figures = {"skips": len(skips), "skip_move_on_max": _max(moves), "skip_overlaps": len(overlaps)}
    return finding


def _overlaps_since(run: RunFacts, runs: list[Event], f: Event) -> list[tuple[Event, Event, Event]]:
    """Pairs of ``runs`` (one stream's starts, in time order) that overlap, the later one
    started after fault ``f`` and before it ended (plus a lease TTL), and no fault on the
    earlier one's replica to explain it."""
    found = []
    horizon = float(f["t_end"] if "t_end" in f else f["t"]) + run.lease_ttl
    for i, a in enumerate(runs):
        if a["t"] > horizon:
            break
        a_end = run.executions.end_of(a)
        if a_end is None or a_end <= f["t"]:
            continue  # ended before, or killed mid-task: nothing of it ran on
        for b in runs[i + 1 :]:
            if b["t"] >= a_end or b["t"] > horizon:
                break
            if b["t"] >= f["t"] and not _faulted(run, a["pid"], a["t"], b["t"]):
                found.append((f, a, b))
    return found


def check_pauses(run: RunFacts) -> Finding:
    """Once an operator's ``pause()`` has returned, no task of the paused queue (any stream of
    it) starts anywhere until the resume: every holder has confirmed that it starts nothing
    more, what it took ahead going back to the stream, or its lease has ended. A process
    frozen whole (SIGSTOP, a GIL hold) is the one excuse, as for any start on a lapsed lease.
    ``pause()`` returns within the lease TTL and a second (plus slack)."""
    pauses = [f for f in run.faults if f["kind"] == "pause"]
    finding = Finding()
    late: list[tuple[Event, Event]] = []
    frozen = 0
    waits = [f["t_returned"] - f["t"] for f in pauses]
    for f, wait in zip(pauses, waits, strict=True):
        if wait > run.lease_ttl + PAUSE_MARGIN + TAKEOVER_SLACK:
            finding.breaches.append(f"{f['target']}: pause() took {wait:.2f}s to return")
        for stream, starts in run.executions.starts_by_queue.items():
            if queue_of(stream) != f["target"]:
                continue
            for e in starts:
                if f["t_returned"] < e["t"] < f["t_resume"]:
                    if run.paused(e["pid"], e["t"]):
                        frozen += 1
                    else:
                        late.append((f, e))
    if late:
        f, e = late[0]
        finding.breaches.append(
            f"{len(late)} tasks started while their queue was paused, e.g. {e['queue']} #{e['seq']} on "
            f"{e['replica']} (fence {e['fence']}) {e['t'] - f['t_returned']:.3f}s after pause() returned "
            f"(confirmed by {f['confirmed']}, unconfirmed {f['unconfirmed']})"
        )
    finding.figures = {
        "pauses": len(pauses),
        "pause_wait_max": _max(waits),
        "pause_holders_confirmed": sum(len(f["confirmed"]) for f in pauses),
        "pause_holders_unconfirmed": sum(len(f["unconfirmed"]) for f in pauses),
        "starts_while_paused": len(late),
        "starts_while_paused_after_a_freeze": frozen,
    }
    return finding


def check_requeues(run: RunFacts) -> Finding:
    """Dead letters requeued to the front of a stream while its holder runs a backlog (docs/guarantees.md,
    "Operator actions and work taken ahead"): every one is moved and runs again; in their
    original (acceptance) order, as one block that no other task starts in the middle of;
    ahead of the work pending at the requeue, but for what a holder had already taken (at
    most a prefetch window and the task it ran)."""
    requeues = [f for f in run.faults if f["kind"] == "requeue-front"]
    finding = Finding()
    pending_after = 0
    pending_before: list[float] = []
    for f in requeues:
        stream, ids = f["target"], set(f["task_ids"])
        if f["moved"] != len(ids):
            finding.breaches.append(f"{stream}: the requeue moved {f['moved']} of {len(ids)} dead letters")
        starts = run.executions.starts_by_queue[stream]
        first: dict[str, float] = {}
        again: dict[str, Event] = {}
        for e in starts:
            first.setdefault(e["task_id"], e["t"])
            if e["t"] > f["t"] and e["task_id"] in ids:
                again.setdefault(e["task_id"], e)
        if len(again) < len(ids):
            finding.breaches.append(f"{stream}: {len(ids) - len(again)} requeued tasks never ran again")
        if not again:
            continue
        accepted = run.accepted.exact.get(stream, [])
        expected = [a["task_id"] for a in accepted if a["task_id"] in again]
        ran = [e["task_id"] for e in sorted(again.values(), key=lambda e: e["t"])]
        if ran != expected:
            at = next((i for i, (x, y) in enumerate(zip(ran, expected, strict=False)) if x != y), len(expected))
            finding.breaches.append(
                f"{stream}: requeued tasks ran again out of their original order, from position {at} of {len(ran)}"
            )
        low, high = min(e["t"] for e in again.values()), max(e["t"] for e in again.values())
        fresh = [e for e in starts if e["task_id"] not in ids and first[e["task_id"]] == e["t"]]
        inside = [e for e in fresh if low < e["t"] < high]
        if inside:
            finding.breaches.append(
                f"{stream}: {len(inside)} other tasks started in the middle of the requeued ones, e.g. "
                f"#{inside[0]['seq']} {inside[0]['t'] - low:.3f}s after the first requeued one"
            )
        pending = {
            a["task_id"]
            for a in accepted
            if run.accepted.available.get((a["queue"], a["seq"]), a["t"]) <= f["t"] and a["task_id"] not in ids
        }
        # Counted from when the requeue had certainly taken effect: a holder may start tasks
        # while the call is on its way.
        ahead = [e for e in fresh if e["task_id"] in pending and f["t_returned"] < e["t"] < low]
        pending_after += sum(1 for e in fresh if e["task_id"] in pending and e["t"] > high)
        pending_before.append(len(ahead))
        if len(ahead) > GROUP_PREFETCH + 1:
            finding.breaches.append(
                f"{stream}: {len(ahead)} tasks pending at the requeue to the front started before the requeued "
                f"ones; a holder takes at most {GROUP_PREFETCH} ahead of the one it runs"
            )
    finding.figures = {
        "requeues": len(requeues),
        "requeued_tasks": sum(len(f["task_ids"]) for f in requeues),
        "requeues_paged": sum(len(f["task_ids"]) > REQUEUE_STEP for f in requeues),
        "requeue_pending_ran_before_max": _max(pending_before),
        "requeue_pending_ran_after": pending_after,
    }
    return finding


def check_stop_kills(run: RunFacts) -> Finding:
    """Figures of the ``stop-kill`` drills (their take-overs are judged with the others, their
    timed-out stops by ``check_timed_out_stops``): how many, and how many killed a replica on a
    shard whose safety poll the stopped replica had."""
    drills = [f for f in run.faults if f["kind"] == "stop-kill"]
    return Finding(
        figures={
            "stop_kills": len(drills),
            "stop_kills_on_a_stopped_pollers_shard": sum(bool(f.get("polled_by_stopped")) for f in drills),
        }
    )


def check_vandal_entries(run: RunFacts) -> Finding:
    """Each vandal entry is dead-lettered as ``undecodable`` with its raw bytes, and its queue
    goes on past it: the first task accepted behind it starts within the take-over bound."""
    vandals = [f for f in run.faults if f["kind"] == "vandal"]
    bound = run.takeover_bound
    finding = Finding()
    missing: list[str] = []
    misfiled: list[str] = []
    stalls: list[float] = []
    for f in vandals:
        _file_vandal_entries(run, f, missing, misfiled)
        took = _vandal_stall(run, f)
        if took is None:
            continue
        stalls.append(took)
        if took > bound:
            finding.breaches.append(
                f"{f['target']}: the first task behind the vandal entries started {took:.2f}s after it was accepted "
                f"> {bound:.2f}s: the queue stalled on them"
            )
    if missing:
        finding.breaches.append(f"{len(missing)} vandal entries are not in the dead letters (lost), e.g. {missing[:2]}")
    if misfiled:
        finding.breaches.append(
            f"{len(misfiled)} vandal entries were dead-lettered but not as undecodable, e.g. {misfiled[:2]}"
        )
    finding.figures = {
        "vandal_entries": sum(len(f["entries"]) for f in vandals),
        "vandal_entries_lost": len(missing),
        "vandal_entries_misfiled": len(misfiled),
        "vandal_stall_max": _max(stalls),
    }
    return finding


def _file_vandal_entries(run: RunFacts, f: Event, missing: list[str], misfiled: list[str]) -> None:
    """Add the entries of vandal fault ``f`` that are not in the dead letters to ``missing``,
    and those dead-lettered under another reason to ``misfiled`` (none if not read)."""
    q = f["target"]
    for raw_hex in f["entries"] if run.dead_letters is not None else ():
        raw = bytes.fromhex(raw_hex)
        reasons = [d["reason"] for d in run.dead_letters or () if d["queue"] == q and raw in bytes.fromhex(d["raw"])]
        if not reasons:
            missing.append(f"{q}: {raw[:48]!r}")
        elif "undecodable" not in reasons:
            misfiled.append(f"{q}: {raw[:48]!r} as {reasons}")


def _vandal_stall(run: RunFacts, f: Event) -> float | None:
    """How long the first task accepted behind vandal fault ``f`` waited to start; None if no
    task came behind it or another fault may have slowed the queue meanwhile."""
    q = f["target"]
    behind = [e for e in run.accepted.exact.get(q, []) if e.get("sent", e["t"]) > f["t_end"]]
    first = behind[0] if behind else None
    start = next((e for e in run.executions.starts_by_queue[q] if first and e["seq"] == first["seq"]), None)
    if first is None or start is None:
        return None
    if any(g["kind"] != "vandal" and run.window(g)[0] <= start["t"] and run.window(g)[1] >= f["t"] for g in run.causes):
        return None
    # A delayed task behind them could not start before its due time.
    took: float = start["t"] - max(f["t_end"], run.accepted.available.get((q, first["seq"]), first["t"]))
    return took


def check_gil_tasks(run: RunFacts) -> Finding:
    """A task that held the GIL past its lease ends dead-lettered for that, never counted as a
    consumer that died (``poison``)."""
    outcomes: dict[str, list[str]] = {}
    finding = Finding(figures={"gil_tasks_dead_lettered_as": outcomes})
    for f in run.faults:
        if f["kind"] != "gil" or run.dead_letters is None:
            continue
        reasons = [d["reason"] for d in run.dead_letters if d["queue"] == f["target"] and d.get("seq") == f["seq"]]
        outcomes[f"{f['target']} #{f['seq']}"] = reasons
        runs = sum(1 for e in run.executions.by_task[f["task_id"]] if e["event"] == "start")
        if not reasons:
            finding.breaches.append(
                f"{f['target']}: the task holding the GIL for {f['seconds']}s (#{f['seq']}, {runs} runs) did not end "
                f"dead-lettered for outliving its lease"
            )
        elif "poison" in reasons:
            finding.breaches.append(
                f"{f['target']}: the task holding the GIL for {f['seconds']}s (#{f['seq']}) ran {runs} times and was "
                f"dead-lettered as poison: a task that outlived its lease was counted as a consumer death"
            )
    return finding


def check_replica_exits(run: RunFacts) -> Finding:
    """No replica exits unless the runner ended it."""
    return Finding(
        [f"{e['replica']} (pid {e['pid']}) exited unexpectedly with {e['rc']}" for e in run.unexpected_exits]
    )


def check_drained(run: RunFacts) -> Finding:
    """Nothing is left pending or in flight when the run ends."""
    left = {q: n for q, n in (run.remaining or {}).items() if n}
    return Finding([f"queues not drained at the end: {left}"] if left else [])


#: Every checker, in the order the verdict lists their breaches.

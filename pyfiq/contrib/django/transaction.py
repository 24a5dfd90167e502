"""Enqueue on commit: a call made inside ``transaction.atomic()`` is sent when the transaction
commits, in call order, and never if it rolls back.

``CommitDeferrer`` is the registry's deferrer (``pyfiq.deferred``). At each call it looks at the
database connections of the calling thread: with none inside an atomic block, the call is sent
at once (autocommit); otherwise its task, encoded and with its id, waits for the commit of every
transaction open at the call, through Django's ``connection.on_commit``, which also drops it
when a savepoint it was called under rolls back.

Calls follow each other into one batch, sent in one round trip per stream at the commit: a call
joins the batch of the callback registered last on the connection when that callback is this
deferrer's, for that database alone, and was registered under the same savepoints. Django would
keep or drop the two callbacks together and run them one after the other, so one batch behaves
exactly as they would.

Redis and the database do not commit together. If the send fails at the commit (Redis down past
``enqueue_timeout``), the data stays committed and ``PartialEnqueueError`` is raised from the
commit (the ``atomic`` block's exit), saying which tasks Redis holds and naming the ids of the
others. Django then runs no later on-commit callback of that transaction; tasks that pyfiq held
for one (called under another savepoint, after another application's callback) are listed as
not sent too. A crash between the commit and the send loses the send: only an outbox (a table
written in the same transaction, relayed to Redis afterwards) closes that gap.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from django.db import connections
from django.db.transaction import TransactionManagementError

from ...deferred import Pending, partial_error, send
from ...errors import PartialEnqueueError

__all__ = ["CommitDeferrer"]

#: How many task ids a commit's send error names in its message (all are in its ``handles``).
SHOWN_IDS = 20


class _Batch:
    """Tasks called in a transaction, in call order, waiting for every database of ``waiting``
    to commit."""

    def __init__(self, deferrer: CommitDeferrer, tasks: list[Pending], aliases: Sequence[str]) -> None:
        self.deferrer = deferrer
        self.tasks = tasks
        self.waiting = set(aliases)
        self.done = False
        self.hooks = {alias: _OnCommit(self, alias) for alias in aliases}


class _OnCommit:
    """The callback ``connection.on_commit`` keeps for one batch on one database."""

    def __init__(self, batch: _Batch, alias: str) -> None:
        self.batch = batch
        self.alias = alias

    def __call__(self) -> None:
        self.batch.deferrer.committed(self.batch, self.alias)

    def __repr__(self) -> str:
        return f"<pyfiq send of {len(self.batch.tasks)} tasks at the commit on {self.alias!r}>"


class CommitDeferrer:
    """Holds a call made inside a database transaction until the transaction commits."""

    def __init__(self) -> None:
        # Per thread (connections are), per database: the batches not sent yet, oldest first.
        self._local = threading.local()

    def defer(self, tasks: Sequence[Pending]) -> bool:
        """Hold ``tasks`` for the commit of the transactions open in this thread (True), or
        leave them to be sent now when none is open (False)."""
        open_ = _open_transactions()
        if not open_:
            return False
        if len(open_) == 1 and _join(open_[0], tasks):
            return True
        batch = _Batch(self, list(tasks), [conn.alias for conn in open_])
        for conn in open_:
            self._track(conn, batch)
            conn.on_commit(batch.hooks[conn.alias])
        return True

    def _batches(self, alias: str) -> list[_Batch]:
        lists: dict[str, list[_Batch]] | None = getattr(self._local, "lists", None)
        if lists is None:
            lists = self._local.lists = {}
        return lists.setdefault(alias, [])

    def _track(self, conn: Any, batch: _Batch) -> None:
        """Keep ``batch`` in the list of its database, pruned of batches sent or dropped (by a
        rollback): the list is what a failed send reports as not sent after it."""
        batches = self._batches(conn.alias)
        alive = {id(entry[1]) for entry in getattr(conn, "run_on_commit", [])}
        batches[:] = [b for b in batches if not b.done and id(b.hooks.get(conn.alias)) in alive]
        batches.append(batch)

    def committed(self, batch: _Batch, alias: str) -> None:
        """``alias`` committed: send ``batch`` if no other database it waits for is left."""
        batch.waiting.discard(alias)
        if batch.waiting or batch.done:
            return
        batch.done = True
        batches = self._batches(alias)
        later: list[_Batch] = []
        if batch in batches:
            at = batches.index(batch)
            later = batches[at + 1 :]
            del batches[: at + 1]
        try:
            send(batch.tasks)
        except PartialEnqueueError as exc:
            for other in later:
                other.done = True  # never sent after a failed send: per stream, no gap
            raise _failed(exc, alias, [p for b in later for p in b.tasks]) from exc.__cause__


def _open_transactions() -> list[Any]:
    """This thread's connections inside an atomic block; an error for one whose transaction
    pyfiq cannot follow (autocommit off outside any atomic block: Django has no commit hook)."""
    found = []
    for conn in connections.all(initialized_only=True):
        if conn.in_atomic_block:
            found.append(conn)
        elif conn.connection is not None and not conn.autocommit:
            raise TransactionManagementError(
                f"pyfiq cannot tell when the transaction on database {conn.alias!r} commits (autocommit "
                "is off outside transaction.atomic()): enqueue inside transaction.atomic(), or pass "
                "on_commit=False to send_with_options to send at once"
            )
    return found


def _join(conn: Any, tasks: Sequence[Pending]) -> bool:
    """Add ``tasks`` to the batch of the callback registered last on ``conn``, if it is this
    deferrer's, waits for this database alone, was registered under the same savepoints
    (Django keeps ``(savepoint ids, callback, robust)`` per callback) and has not run: one that
    ran waits for nothing, though ``TestCase.captureOnCommitCallbacks`` leaves it listed."""
    hooks = getattr(conn, "run_on_commit", None)
    if not isinstance(hooks, list) or not hooks or not isinstance(hooks[-1], tuple) or len(hooks[-1]) != 3:
        return False
    sids, func, _ = hooks[-1]
    if not isinstance(func, _OnCommit) or func.batch.waiting != {conn.alias} or sids != set(conn.savepoint_ids):
        return False
    func.batch.tasks.extend(tasks)
    return True


def _failed(exc: PartialEnqueueError, alias: str, later: list[Pending]) -> PartialEnqueueError:
    """The error a failed send raises from the commit: ``exc``'s account of the batch, with the
    tasks of later batches (which Django will not run) counted as not sent."""
    handles = [*exc.handles, *(p.handle for p in later)]
    lost = [handles[i].id for i in (*exc.unknown, *exc.unsent)] + [p.handle.id for p in later]
    shown = ", ".join(lost[:SHOWN_IDS]) + (f" and {len(lost) - SHOWN_IDS} more" if len(lost) > SHOWN_IDS else "")
    cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
    return partial_error(
        cause,
        handles,
        exc.accepted,
        exc.unknown,
        what=f"the send of the tasks called in a transaction on database {alias!r}, at its commit,",
        advice=(
            "the transaction's data IS committed, and the tasks not confirmed will not run unless sent "
            f"again (ids: {shown}; those of later batches may include calls a savepoint rollback dropped)"
        ),
    )

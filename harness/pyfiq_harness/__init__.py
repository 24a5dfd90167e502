"""pyfiq's fault-injection harness, a distribution of its own (``pip install -e harness``) that
the runtime never imports: the scenario runner, the loopback fault proxy, the clock shim, and
the process helpers the test suite and the benchmarks share. Many replicas, proven.

One run starts a ``redis-server`` with AOF (or uses ``--redis URL``), N replica processes
(``python -m pyfiq worker pyfiq_harness.replica``, each behind its own loopback
:class:`~pyfiq_harness.proxy.FaultProxy`),
M scenario queues and P producer processes (``python -m pyfiq_harness producer``) enqueuing to
the same queues concurrently, then injects a schedule of faults, drains, and checks the
outcome from the journals:

- ``executions.jsonl``: every start/end/fail of a task (written by ``pyfiq.ops.scenario_tasks.step`` in
  the replicas);
- ``accepted-<producer>.jsonl``: every task Redis accepted, with its place in Redis's own
  order (a counter and Redis's clock read in the same MULTI/EXEC as the enqueue, so the
  acceptance order across concurrent producers is exact, not guessed from client clocks);
- ``faults.jsonl``: every fault the runner injected, with its target and its time span;
- ``dead-letters.jsonl``: every dead letter left at the end (reason, raw bytes).

Faults: SIGKILL, SIGSTOP, a cut, blackholed, delayed or reply-delayed (``slow-reply``) link of
one replica; Redis restarted, crashed, or restarted with its wall clock shifted (``clock``,
through the ``clock_shift.c`` LD_PRELOAD shim); malformed entries pushed into a live queue
(``vandal``); an asyncio worker stopped with a short timeout mid-task in a process that lives
on (``async-stop``); a task holding the GIL past the lease TTL (``gil``); a rolling restart.
An operator's actions against a holder with tasks taken ahead: a skip of the head it runs
(``skip``), a pause and a later resume (``pause``), dead letters requeued to the front of a
stream, in one step or in pages (``requeue-front``); and a worker stopped with a short timeout
mid-task, followed by a SIGKILL of another replica (``stop-kill``).

The producer side has a drill of its own (``enqueue_drill``): enqueues sharing round trips
while a caller is cancelled or interrupted, the process forks, or durable mode's replica stalls,
each call's outcome judged against what Redis stored.

``verdict.verify`` turns them into a ``Verdict``, one checker per property (``CHECKERS``: each
reads the run's ``RunFacts`` and returns a ``Finding``, its breaches and its figures);
``scenario.Scenario`` is one run, step by step. The docker-compose ``checker`` service runs
the same function through ``python -m pyfiq_harness check``, its ``producer`` service the same
``produce`` function, and its ``app`` service the same ``python -m pyfiq worker pyfiq_harness.replica`` command.

Everything runs on loopback, bounded in time and in count.

Modules, in the order a run uses them: ``servers`` (child processes, free ports, ``wait_for``,
``RedisProcess``), ``topologies`` (Cluster, Sentinel, TLS), ``clock`` (the clock shim),
``proxy`` (the fault proxy), ``profiles``, ``journal``, ``fleet``, ``producers``,
``injection`` / ``drills`` / ``injector`` (the faults), ``facts`` / ``checkers`` /
``drill_checks`` / ``verdict`` (the judge), ``scenario`` (one run) and ``cli``.
"""

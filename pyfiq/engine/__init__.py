"""The engine: pyfiq's decisions and its wire protocol, without I/O.

Key schema (``keys``), script calls and replies (``protocol``, ``lua/``), leases (``lease``),
one lease's state machine (``stream``), one task's attempts (``task_run``), outcomes and
dead-letter records (``outcomes``), what to claim and when (``scheduler``), and the clock and
events it shares with its drivers (``events``). Nothing here imports redis, asyncio, threads,
the clock, logging, hooks, the API or the drivers: the drivers give it their clock and locks,
and log, call hooks and run callbacks from the events it keeps. Tests drive it with scripted
replies and a hand-set clock.
"""

"""The engine: pyfiq's decisions and its wire protocol, without I/O.

Key schema (``keys``), script calls and replies (``protocol``, ``lua/``), leases (``lease``),
one lease's state machine (``stream``), one task's attempts (``task_run``), outcomes and
dead-letter records (``outcomes``), what to claim and when (``scheduler``). Nothing here
imports redis, asyncio, the API or the drivers; tests drive it with scripted replies.
"""

"""The I/O edge: ``RedisQueueBackend`` (``backend``), a thin facade over its rooms:
``transport`` (clients, script calls, ``lean`` and ``durable`` paths, ``failures``, ``twin``
clients, the embedded ``memory`` server), ``enqueue`` (with ``coalesce``), ``admin`` (with
``reads``, ``views`` and ``halts``); ``connect`` describes where Redis is, ``scripts`` loads
the Lua.
"""

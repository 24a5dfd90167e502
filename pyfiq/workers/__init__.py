"""The drivers: ``ThreadedWorker`` and ``AsyncWorker``, twins that carry out the engine's calls
with threads or asyncio and differ only in how they wait. What they share: ``base`` (the
scheduler with the real clock and the driver's locks), ``reports`` (the engine's events logged,
handed to hooks and turned into callbacks) and ``limits`` (time limits).
"""

"""The drivers: ``ThreadedWorker`` and ``AsyncWorker``, twins that carry out the engine's calls
with threads or asyncio and differ only in how they wait.
"""

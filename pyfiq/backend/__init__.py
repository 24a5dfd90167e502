"""The I/O edge: the Redis backend (sync and asyncio clients from one description, the
embedded ``memory://`` server, enqueue, inspection and operator actions) and script loading.
"""

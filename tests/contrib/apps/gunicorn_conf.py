"""gunicorn hooks of the pre-fork test: the Flask app's embedded worker starts in each worker
process once it is initialized (after the fork; the master starts none). It stops in the
worker's ``worker_exit`` hook, handing its leases over, which the hook notes in Redis (the
extension's atexit stop would do the same, later)."""

from __future__ import annotations

import os
from typing import Any


def post_worker_init(worker: Any) -> None:
    from flask_app import pyfiq_ext

    pyfiq_ext.start_worker()


def worker_exit(server: Any, worker: Any) -> None:
    import redis
    from flask_app import PREFIX, URL, pyfiq_ext

    stopped = pyfiq_ext.stop_worker()
    client = redis.Redis.from_url(URL)
    try:
        client.rpush(f"{PREFIX}:hook-stops", f"{os.getpid()}:{int(stopped)}")
    finally:
        client.close()

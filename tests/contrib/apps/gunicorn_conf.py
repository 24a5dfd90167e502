"""gunicorn hooks of the pre-fork test: the Flask app's embedded worker starts in each worker
process once it is initialized (after the fork; the master starts none). It stops at the
worker's exit (the extension's atexit stop), handing its leases over."""

from __future__ import annotations

from typing import Any


def post_worker_init(worker: Any) -> None:
    from flask_app import pyfiq_ext

    pyfiq_ext.start_worker()

"""What ``ready()`` sets up from ``settings.PYFIQ``: the backend, enqueue on commit, the tasks
modules, fresh database connections around each task, and the embedded worker.

Where an embedded worker starts. ``ready()`` runs in every process that sets Django up: the
serving processes, but also ``migrate``, ``shell`` and every other management command, the
autoreloader's parent process of ``runserver``, and the master of a pre-fork server that
imports the application before it forks (gunicorn ``--preload``), whose threads would not
survive the fork. So ``ready()`` starts nothing: a process starts its worker when it serves its
first request (Django's ``request_started`` signal), which only a serving process does, after
any fork. A serving process that should work its queues before its first request calls
``start_worker()`` itself, from the server's post-fork hook (gunicorn ``post_worker_init``).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from django.core.signals import request_started
from django.db import close_old_connections
from django.utils.module_loading import autodiscover_modules

from ... import hooks
from ...engine.outcomes import describe_error
from ...errors import ConfigurationError
from ...functions import default_registry
from ...logs import log
from ...task import TaskContext
from ...workers.threaded import ThreadedWorker
from ..embedded import EmbeddedWorker
from .conf import DjangoSettings, PyfiqImproperlyConfigured, read_settings
from .transaction import CommitDeferrer

__all__ = ["configure", "current_settings", "embedded_worker", "start_worker"]


class _FreshConnections(hooks.Hooks):
    """Around each task, what Django does around each request: close this thread's database
    connections that are broken or older than ``CONN_MAX_AGE``, so that a worker thread that
    lives for days never runs a task on a connection the database has dropped."""

    def before_execution(self, ctx: TaskContext) -> None:
        _close_old_connections()

    def after_execution(self, ctx: TaskContext, outcome: Any, duration: float) -> None:
        _close_old_connections()


def _close_old_connections() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        close_old_connections()
    # An event loop's thread (an async task's hooks) holds no connection Django lets it use.


_state: dict[str, Any] = {"settings": None, "embedded": None, "failed_in": None}
_fresh = _FreshConnections()


def configure(config: Any) -> DjangoSettings:
    """Configure pyfiq from ``config`` (``settings.PYFIQ``; what ``ready()`` calls): the
    default registry's backend, its deferrer (enqueue on commit, unless ``ON_COMMIT`` is
    False), the ``AUTODISCOVER`` modules, and, with ``EMBEDDED_WORKER``, the worker that each
    serving process starts at its first request. Connects to nothing."""
    conf = read_settings(config)
    try:
        backend = conf.backend()
    except ConfigurationError as exc:
        raise PyfiqImproperlyConfigured(f"settings.PYFIQ: {exc}") from None
    default_registry.configure(backend)
    default_registry.deferrer = CommitDeferrer() if conf.on_commit else None
    hooks.remove(_fresh)
    hooks.add(_fresh)
    if conf.autodiscover:
        autodiscover_modules(conf.autodiscover)
    previous = _state["embedded"]
    if previous is not None:
        previous.stop()
    embedded = None
    if conf.embedded_worker:
        embedded = EmbeddedWorker(
            backend, queues=conf.queues, concurrency=conf.concurrency, stop_timeout=conf.stop_timeout
        )
        request_started.connect(_start_on_request, dispatch_uid="pyfiq.contrib.django.embedded")
    else:
        request_started.disconnect(dispatch_uid="pyfiq.contrib.django.embedded")
    _state.update(settings=conf, embedded=embedded, failed_in=None)
    return conf


def _start_on_request(sender: Any, **kwargs: Any) -> None:
    embedded: EmbeddedWorker | None = _state["embedded"]
    if embedded is None or _state["failed_in"] == os.getpid():
        return
    try:
        embedded.start()  # cheap once this process's worker runs
    except Exception as exc:
        # The request is not the worker's: it is served all the same. What cannot start now
        # (Redis refusing the password) will not start at the next request either: said once.
        _state["failed_in"] = os.getpid()
        log.error("pyfiq.embedded_worker_failed", pid=os.getpid(), error=describe_error(exc))


def current_settings() -> DjangoSettings:
    """``settings.PYFIQ`` as ``ready()`` read it."""
    conf: DjangoSettings | None = _state["settings"]
    if conf is None:
        raise PyfiqImproperlyConfigured(
            "pyfiq.contrib.django is not set up: add it to INSTALLED_APPS and call django.setup()"
        )
    return conf


def embedded_worker() -> EmbeddedWorker | None:
    """The embedded worker (``EMBEDDED_WORKER``), started or not in this process; None when
    the setting is off."""
    embedded: EmbeddedWorker | None = _state["embedded"]
    return embedded


def start_worker() -> ThreadedWorker:
    """Start this process's embedded worker now rather than at its first request (or get it,
    if it runs): for a pre-fork server's post-fork hook, e.g. gunicorn's
    ``def post_worker_init(worker): pyfiq.contrib.django.start_worker()``."""
    embedded = embedded_worker()
    if embedded is None:
        raise PyfiqImproperlyConfigured('start_worker() needs settings.PYFIQ["EMBEDDED_WORKER"] = True')
    return embedded.start()

"""Flask: ``PyfiqExtension(app)`` configures pyfiq from ``app.config`` and adds ``flask pyfiq``.

``PYFIQ_URL`` (or ``PYFIQ_BACKEND``, a ready [`RedisQueueBackend`][pyfiq.RedisQueueBackend]) says where Redis
is, ``PYFIQ_CLUSTER`` that the URL names a Redis Cluster node, and ``PYFIQ_<FIELD>`` sets the
[`Settings`][pyfiq.Settings] field of that name (``PYFIQ_PREFIX``, ``PYFIQ_LEASE_TTL``, ...).
``PYFIQ_WORKER = "embedded"`` runs a worker in every process that serves the app, started by
the first request the process handles (or by [`start_worker`][pyfiq.contrib.flask.PyfiqExtension.start_worker] from a
server's post-fork hook), so never in ``flask --help``, ``flask routes`` or a pre-fork server's
master. ``PYFIQ_QUEUES``, ``PYFIQ_CONCURRENCY`` and ``PYFIQ_STOP_TIMEOUT`` shape that worker and
are the defaults of ``flask pyfiq worker``, which is ``pyfiq worker`` itself (the same options
and code) starting from the app's configuration. Any other ``PYFIQ_*`` key is refused: a typo
must not leave a setting silently at its default.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import click
from flask import Flask, current_app
from flask.cli import AppGroup, with_appcontext

from ..backend.backend import RedisQueueBackend
from ..config import Settings
from ..errors import ConfigurationError
from ..functions import Registry, default_registry
from ..ops import cli
from ..workers.threaded import ThreadedWorker
from .commands import worker_defaults as shared_defaults
from .embedded import EmbeddedWorker

__all__ = ["PyfiqExtension", "PyfiqState", "read_config"]

#: ``PYFIQ_<FIELD>`` for every ``Settings`` field.
SETTINGS_KEYS = {f"PYFIQ_{f.name.upper()}": f.name for f in dataclasses.fields(Settings)}
#: The keys that are not ``Settings`` fields.
OWN_KEYS = (
    "PYFIQ_URL",
    "PYFIQ_BACKEND",
    "PYFIQ_CLUSTER",
    "PYFIQ_WORKER",
    "PYFIQ_QUEUES",
    "PYFIQ_CONCURRENCY",
    "PYFIQ_STOP_TIMEOUT",
)
KNOWN_KEYS = frozenset((*OWN_KEYS, *SETTINGS_KEYS))
#: ``PYFIQ_WORKER``: None, no worker in the web processes (run ``flask pyfiq worker``).
WORKER_MODES = (None, "embedded")
EXTENSION = "pyfiq"


@dataclasses.dataclass
class PyfiqState:
    """What ``init_app`` made of one app's configuration (``app.extensions["pyfiq"]``)."""

    backend: RedisQueueBackend
    registry: Registry
    #: The URL ``PYFIQ_CLUSTER`` applies to, for a worker given another ``--redis``.
    cluster: bool = False
    queues: list[str] | None = None
    concurrency: int = 4
    stop_timeout: float = 30.0
    #: Set when ``PYFIQ_WORKER = "embedded"``.
    embedded: EmbeddedWorker | None = None

    def worker_defaults(self) -> dict[str, Any]:
        """The app's configuration as defaults of ``pyfiq worker``'s options."""
        return shared_defaults(
            str(self.backend.url), self.backend.settings, self.queues, self.concurrency, self.stop_timeout
        )

    def worker_backend(self, url: str, prefix: str, shards: int | None, **tuning: Any) -> RedisQueueBackend:
        """The backend of ``flask pyfiq worker``: the app's, with what its options changed.
        Settings no option names (the serializer, connection options) stay the app's."""
        base = self.backend
        # pyfiq worker raises batch_limit to 100; the app's own value is the floor here.
        tuning["batch_limit"] = max(base.settings.batch_limit, tuning.get("prefetch") or 0)
        settings = base.settings.replace(prefix=prefix, shards=shards or base.settings.shards, **tuning)
        if url != str(base.url):
            return RedisQueueBackend(url, settings, cluster=self.cluster)
        return base if settings == base.settings else base.copy(settings)


def read_config(config: Mapping[str, Any], registry: Registry | None = None) -> PyfiqState:
    """The state ``app.config``'s ``PYFIQ_*`` keys describe; ConfigurationError, naming the
    key, for an unknown key or a value that cannot work."""
    unknown = sorted(k for k in config if isinstance(k, str) and k.startswith("PYFIQ_") and k not in KNOWN_KEYS)
    if unknown:
        hints = [f"{k} (did you mean {close}?)" if (close := _close(k)) else k for k in unknown]
        raise ConfigurationError(
            f"unknown pyfiq key(s) in app.config: {', '.join(hints)}; known keys: {', '.join(sorted(KNOWN_KEYS))}"
        )
    mode = config.get("PYFIQ_WORKER")
    if mode not in WORKER_MODES:
        raise ConfigurationError(
            f"PYFIQ_WORKER must be None (no worker in the web processes: run `flask pyfiq worker`) "
            f"or 'embedded' (one in every process serving the app), got {mode!r}"
        )
    queues = config.get("PYFIQ_QUEUES")
    if queues is not None and (isinstance(queues, str) or not all(isinstance(q, str) for q in queues)):
        raise ConfigurationError(f"PYFIQ_QUEUES must be a list of queue names or None, got {queues!r}")
    concurrency = config.get("PYFIQ_CONCURRENCY", 4)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ConfigurationError(f"PYFIQ_CONCURRENCY must be a whole number of at least 1, got {concurrency!r}")
    stop_timeout = config.get("PYFIQ_STOP_TIMEOUT", 30.0)
    if isinstance(stop_timeout, bool) or not isinstance(stop_timeout, (int, float)) or not stop_timeout >= 0:
        raise ConfigurationError(f"PYFIQ_STOP_TIMEOUT must be a number of seconds >= 0, got {stop_timeout!r}")
    cluster = bool(config.get("PYFIQ_CLUSTER", False))
    state = PyfiqState(
        _backend(config, cluster),
        default_registry if registry is None else registry,
        cluster,
        None if queues is None else list(queues),
        concurrency,
        float(stop_timeout),
    )
    if mode == "embedded":
        state.embedded = EmbeddedWorker(
            state.backend,
            queues=state.queues,
            concurrency=concurrency,
            registry=state.registry,
            stop_timeout=state.stop_timeout,
        )
    return state


def _close(key: str) -> str | None:
    close = difflib.get_close_matches(key, KNOWN_KEYS, n=1, cutoff=0.8)
    return close[0] if close else None


def _backend(config: Mapping[str, Any], cluster: bool) -> RedisQueueBackend:
    url, given = config.get("PYFIQ_URL"), config.get("PYFIQ_BACKEND")
    fields = {name: config[key] for key, name in SETTINGS_KEYS.items() if key in config}
    try:
        if given is not None:
            if url is not None or "PYFIQ_CLUSTER" in config:
                raise ConfigurationError("PYFIQ_BACKEND describes its Redis: drop PYFIQ_URL and PYFIQ_CLUSTER")
            if not isinstance(given, RedisQueueBackend):
                raise ConfigurationError(f"PYFIQ_BACKEND must be a RedisQueueBackend, got {type(given).__name__}")
            return given.copy(**fields) if fields else given
        if not isinstance(url, str) or not url:
            raise ConfigurationError(
                "set PYFIQ_URL in app.config (e.g. 'redis://localhost:6379/0') or PYFIQ_BACKEND to a RedisQueueBackend"
            )
        return RedisQueueBackend(url, Settings(**fields), cluster=cluster)
    except ConfigurationError:
        raise
    except (TypeError, ValueError) as exc:  # a value of the wrong type, a malformed URL
        raise ConfigurationError(f"pyfiq's app.config keys: {exc}") from exc


class PyfiqExtension:
    """pyfiq for a Flask app: ``PyfiqExtension(app)``, or ``ext = PyfiqExtension()`` then
    ``ext.init_app(app)`` in an app factory.

    ``init_app`` reads ``app.config`` (see the module's docstring), makes its backend the
    backend of ``registry``'s ``@fifo`` functions (the default registry's unless given; one
    backend per registry, so several apps in one process with different Redis need a registry
    each), adds the ``flask pyfiq`` commands and, with ``PYFIQ_WORKER = "embedded"``, starts
    the process's worker on its first request. Nothing connects to Redis before that.
    """

    def __init__(self, app: Flask | None = None, *, registry: Registry | None = None) -> None:
        self.registry = registry
        self.app = app
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        state = read_config(app.config, self.registry)
        state.registry.configure(state.backend)
        app.extensions[EXTENSION] = state
        app.cli.add_command(pyfiq_commands)
        if state.embedded is not None:
            app.wsgi_app = _StartsWorker(app.wsgi_app, state.embedded)  # type: ignore[method-assign]

    def state(self, app: Flask | None = None) -> PyfiqState:
        """The state of ``app``: by default the app of the current context, else the one this
        extension was built with."""
        app = app or _current() or self.app
        if app is None or EXTENSION not in app.extensions:
            raise ConfigurationError("no Flask app with pyfiq here: call init_app(app) or pass app=")
        state: PyfiqState = app.extensions[EXTENSION]
        return state

    @property
    def backend(self) -> RedisQueueBackend:
        return self.state().backend

    @property
    def worker(self) -> ThreadedWorker | None:
        """This process's embedded worker, if it runs."""
        embedded = self.state().embedded
        return None if embedded is None else embedded.worker

    def start_worker(self, app: Flask | None = None) -> ThreadedWorker:
        """Start this process's embedded worker now (if it does not run yet) and return it: for
        a server's post-fork hook (gunicorn's ``post_worker_init``, uWSGI's ``@postfork``)."""
        embedded = self.state(app).embedded
        if embedded is None:
            raise ConfigurationError('set PYFIQ_WORKER = "embedded" to run a worker in the web processes')
        return embedded.start()

    def stop_worker(self, timeout: float | None = None, app: Flask | None = None) -> bool:
        """Stop this process's embedded worker (handing its leases over); False if a task was
        still running at the timeout (``PYFIQ_STOP_TIMEOUT`` unless given)."""
        embedded = self.state(app).embedded
        return True if embedded is None else embedded.stop(timeout)


def _current() -> Flask | None:
    return current_app._get_current_object() if current_app else None  # type: ignore[attr-defined]


class _StartsWorker:
    """WSGI middleware starting the process's embedded worker before its first request, and
    only then: a request is served only in a process that serves the app, after any fork."""

    def __init__(self, app: Callable[..., Iterable[bytes]], embedded: EmbeddedWorker) -> None:
        self.app = app
        self.embedded = embedded

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        self.embedded.start()
        return self.app(environ, start_response)


class _Commands(cli._Main, AppGroup):
    """``flask pyfiq``: errors an operator can fix are one line, as with ``pyfiq``."""


@click.group("pyfiq", cls=_Commands)
@with_appcontext  # `flask` pushes one already; app.test_cli_runner() does not
@click.pass_context
def pyfiq_commands(ctx: click.Context) -> None:
    """pyfiq's commands, configured by the app's PYFIQ_* keys (options override them)."""
    state: PyfiqState = current_app.extensions[EXTENSION]
    ctx.default_map = {"worker": state.worker_defaults()}
    ctx.meta[cli.BACKEND_FACTORY] = state.worker_backend


pyfiq_commands.add_command(cli.worker)

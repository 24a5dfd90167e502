"""``settings.PYFIQ``, read and checked once: which Redis, how pyfiq behaves, where workers run.

Every key is optional; a key pyfiq does not know is refused, naming it (a typo must not silently
leave a default in force). The keys:

- ``URL`` (default ``$PYFIQ_REDIS_URL``, else ``redis://localhost:6379/0``); ``CLUSTER``: the URL
  is a startup node of a Redis Cluster; ``SENTINELS`` (``["host:26379", ...]``),
  ``SENTINEL_SERVICE`` (default ``"mymaster"``) and ``SENTINEL_OPTIONS``: find the primary through
  Sentinel (the URL then gives only credentials, database and TLS).
- Every field of ``pyfiq.Settings``, upper-cased: ``PREFIX``, ``SHARDS``, ``LEASE_TTL``,
  ``ENQUEUE_TIMEOUT``, ``REDIS_OPTIONS``, ``SERIALIZER`` (an instance, or the dotted path of a
  class or instance)...
- ``ON_COMMIT`` (default True): an enqueue made inside ``transaction.atomic()`` is sent when the
  transaction commits, never if it rolls back.
- ``AUTODISCOVER`` (default ``"tasks"``): the module of each installed app imported at startup,
  so that its ``@fifo`` functions are registered; None imports none.
- ``EMBEDDED_WORKER`` (default False): run a worker in each process that serves requests, with
  ``CONCURRENCY`` (default 4), ``QUEUES`` (default: every registered queue) and
  ``STOP_TIMEOUT`` (default 30 s, at interpreter exit). ``CONCURRENCY`` and ``QUEUES`` are also
  the defaults of ``manage.py pyfiq_worker``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from ...backend.backend import RedisQueueBackend
from ...backend.connect import primary_options, sentinel_addresses
from ...config import Redacted, SecretURL, Settings
from ...engine.keys import validate_queue_name
from ...errors import ConfigurationError

__all__ = ["DjangoSettings", "PyfiqImproperlyConfigured", "read_settings"]

#: The Redis asked when ``URL`` is not set and neither is ``$PYFIQ_REDIS_URL`` (as the CLI does).
DEFAULT_URL = "redis://localhost:6379/0"
#: ``settings.PYFIQ`` keys that set a field of ``pyfiq.Settings``.
SETTINGS_KEYS = {f.name.upper(): f.name for f in fields(Settings)}
#: The integration's own keys.
OWN_KEYS = (
    "URL",
    "CLUSTER",
    "SENTINELS",
    "SENTINEL_SERVICE",
    "SENTINEL_OPTIONS",
    "ON_COMMIT",
    "AUTODISCOVER",
    "EMBEDDED_WORKER",
    "CONCURRENCY",
    "QUEUES",
    "STOP_TIMEOUT",
)
KNOWN_KEYS = (*OWN_KEYS, *SETTINGS_KEYS)


class PyfiqImproperlyConfigured(ImproperlyConfigured, ConfigurationError):  # type: ignore[misc]
    """``settings.PYFIQ`` is wrong: Django's ``ImproperlyConfigured`` and pyfiq's
    ``ConfigurationError`` at once, so either ``except`` catches it."""


@dataclass(frozen=True)
class DjangoSettings:
    """``settings.PYFIQ`` checked: what ``backend()`` connects with, and the integration's own
    choices. Its repr shows no password (the URL's, or one in the options)."""

    url: SecretURL
    settings: Settings
    cluster: bool = False
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_service: str = "mymaster"
    sentinel_options: Redacted | None = None
    on_commit: bool = True
    autodiscover: str | None = "tasks"
    embedded_worker: bool = False
    concurrency: int = 4
    queues: tuple[str, ...] | None = None
    stop_timeout: float = 30.0

    def backend(self, url: str | None = None, **overrides: Any) -> RedisQueueBackend:
        """A new backend as configured; ``url`` and ``overrides`` (``Settings`` fields) replace
        what the settings say (``manage.py pyfiq_worker``'s command-line options)."""
        url = self.url if url is None else url
        settings = self.settings.replace(**overrides) if overrides else self.settings
        if self.sentinels:
            # The URL gives the primary's credentials, database and TLS; Sentinel its address.
            primary = settings.replace(redis_options={**primary_options(url), **settings.redis_options})
            return RedisQueueBackend.from_sentinel(
                self.sentinels, self.sentinel_service, primary, sentinel_options=dict(self.sentinel_options or {})
            )
        return RedisQueueBackend(url, settings, cluster=self.cluster)


def _error(message: str) -> PyfiqImproperlyConfigured:
    return PyfiqImproperlyConfigured(f"settings.PYFIQ: {message}")


def _unknown(key: object) -> PyfiqImproperlyConfigured:
    close = difflib.get_close_matches(str(key).upper(), KNOWN_KEYS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return _error(f"unknown key {key!r}{hint}; the keys are {', '.join(KNOWN_KEYS)}")


def _flag(config: Mapping[str, Any], key: str, default: bool) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise _error(f"{key} must be True or False, got {type(value).__name__}")
    return value


def _queues(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise _error(f"QUEUES must be a non-empty list of queue names or None, got {value!r}")
    try:
        return tuple(validate_queue_name(q) for q in value)
    except ConfigurationError as exc:
        raise _error(f"QUEUES: {exc}") from None


def _serializer(value: Any) -> Any:
    """An instance as given; a dotted path names a class (instantiated) or an instance."""
    if not isinstance(value, str):
        return value
    try:
        found = import_string(value)
    except ImportError as exc:
        raise _error(f"SERIALIZER: cannot import {value!r}: {exc}") from None
    return found() if isinstance(found, type) else found


def _settings(config: Mapping[str, Any]) -> Settings:
    given = {SETTINGS_KEYS[k]: v for k, v in config.items() if k in SETTINGS_KEYS}
    if "serializer" in given:
        given["serializer"] = _serializer(given["serializer"])
    if not isinstance(given.get("redis_options", {}), Mapping):
        raise _error("REDIS_OPTIONS must be a dict of redis-py connection options")
    try:
        return Settings(**given)
    except (ConfigurationError, TypeError, ValueError) as exc:
        # Settings name their field in lower case: the key here is the same, upper-cased.
        raise _error(str(exc)) from None


def _workers(config: Mapping[str, Any]) -> dict[str, Any]:
    concurrency = config.get("CONCURRENCY", 4)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise _error(f"CONCURRENCY must be a whole number of at least 1, got {concurrency!r}")
    stop_timeout = config.get("STOP_TIMEOUT", 30.0)
    if isinstance(stop_timeout, bool) or not isinstance(stop_timeout, (int, float)) or not 0 <= stop_timeout < 1e9:
        raise _error(f"STOP_TIMEOUT must be a number of seconds >= 0, got {stop_timeout!r}")
    autodiscover = config.get("AUTODISCOVER", "tasks")
    if autodiscover is not None and (not isinstance(autodiscover, str) or not autodiscover):
        raise _error(f"AUTODISCOVER must be a module name such as 'tasks', or None, got {autodiscover!r}")
    return {
        "embedded_worker": _flag(config, "EMBEDDED_WORKER", False),
        "concurrency": concurrency,
        "queues": _queues(config.get("QUEUES")),
        "stop_timeout": float(stop_timeout),
        "autodiscover": autodiscover,
    }


def _connection(config: Mapping[str, Any]) -> dict[str, Any]:
    url = config.get("URL") or os.environ.get("PYFIQ_REDIS_URL") or DEFAULT_URL
    if not isinstance(url, str):
        raise _error(f"URL must be a string such as 'redis://host:6379/0', got {type(url).__name__}")
    found: dict[str, Any] = {"url": SecretURL(url), "cluster": _flag(config, "CLUSTER", False)}
    if config.get("SENTINELS"):
        if found["cluster"]:
            raise _error("CLUSTER and SENTINELS exclude each other")
        try:
            found["sentinels"] = sentinel_addresses(config["SENTINELS"])
        except (ConfigurationError, TypeError, ValueError) as exc:
            raise _error(f"SENTINELS: {exc}") from None
        options = config.get("SENTINEL_OPTIONS") or {}
        if not isinstance(options, Mapping):
            raise _error("SENTINEL_OPTIONS must be a dict of the sentinels' connection options")
        found["sentinel_options"] = Redacted(options)
        found["sentinel_service"] = str(config.get("SENTINEL_SERVICE", "mymaster"))
    elif "SENTINEL_SERVICE" in config or "SENTINEL_OPTIONS" in config:
        raise _error("SENTINEL_SERVICE and SENTINEL_OPTIONS need SENTINELS")
    return found


def read_settings(config: Any) -> DjangoSettings:
    """``settings.PYFIQ`` (None: every default) checked, or ``PyfiqImproperlyConfigured``
    naming the key at fault. Nothing connects to Redis here."""
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise _error(f"must be a dict, got {type(config).__name__}")
    for key in config:
        if key not in KNOWN_KEYS:
            raise _unknown(key)
    return DjangoSettings(
        settings=_settings(config),
        on_commit=_flag(config, "ON_COMMIT", True),
        **_connection(config),
        **_workers(config),
    )

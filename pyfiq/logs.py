"""pyfiq's logger: structlog's API on top of the standard library logger ``pyfiq``.

A library is a guest in its host's process: it configures neither structlog nor logging
globally, adds only a ``NullHandler``, and so prints nothing unless the application configures
logging. Every event becomes one ``logging`` record on the ``pyfiq`` logger whose message is
``event key=value ...`` and whose ``pyfiq`` attribute holds the event's fields, for handlers
that want them structured. The standard library's handlers report their own failures (a
closed pipe, a full disk) instead of raising into the caller, so logging can never take a
worker thread down.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

import structlog

LOGGER_NAME = "pyfiq"

_stdlib = logging.getLogger(LOGGER_NAME)
_stdlib.addHandler(logging.NullHandler())


def _safe(value: Any) -> str:
    try:
        return value if isinstance(value, str) else repr(value)
    except Exception:  # a foreign __repr__ must not break logging
        return f"<{type(value).__qualname__} object>"


def _to_record(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> tuple[Any, ...]:
    event = event_dict.pop("event", "")
    exc_info = event_dict.pop("exc_info", None)
    text = " ".join([str(event), *(f"{k}={_safe(v)}" for k, v in event_dict.items())])
    kwargs: dict[str, Any] = {"extra": {"pyfiq": dict(event_dict, event=event)}}
    if exc_info:
        kwargs["exc_info"] = exc_info
    return (text,), kwargs


class _GuestLogger(structlog.stdlib.BoundLogger):
    """Never raises into pyfiq: a broken handler of the host (one that raises instead of
    reporting its failure) must not kill the worker thread that logged."""

    def _proxy_to_logger(self, method_name: str, event: str | None = None, *event_args: str, **event_kw: Any) -> Any:
        try:
            return super()._proxy_to_logger(method_name, event, *event_args, **event_kw)
        except Exception:
            return None


def get_logger(**initial: Any) -> Any:
    """A structlog bound logger writing to the ``pyfiq`` standard library logger."""
    return structlog.wrap_logger(
        _stdlib,
        processors=[structlog.stdlib.filter_by_level, _to_record],
        wrapper_class=_GuestLogger,
        **initial,
    )


log = get_logger()


def debug_enabled() -> bool:
    """Whether debug events would go anywhere: the hot path asks before it builds one."""
    return _stdlib.isEnabledFor(logging.DEBUG)

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
import re
from collections.abc import MutableMapping
from typing import Any

import structlog

LOGGER_NAME = "pyfiq"

_stdlib = logging.getLogger(LOGGER_NAME)
_stdlib.addHandler(logging.NullHandler())


#: What a terminal or a line-oriented reader acts on instead of showing, besides the C0 controls
#: (line breaks, carriage return, escape): DEL, the C1 controls (a one-byte CSI among them), the
#: Unicode line and paragraph separators, the bidirectional marks, overrides and isolates that
#: reorder what is shown, and lone surrogates (which cannot even be written out as UTF-8).
_OTHER_CONTROLS = r"\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_UNSAFE = re.compile(rf"[\x00-\x1f{_OTHER_CONTROLS}]")
_UNSAFE_BUT_NEWLINE = re.compile(rf"[\x00-\x09\x0b-\x1f{_OTHER_CONTROLS}]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` safe to show on a terminal or in a one-line log record: every control character
    (C0, DEL, C1 and those of ``_OTHER_CONTROLS``) written as a visible escape (``\\n``, ``\\r``,
    ``\\t``, ``\\x1b``, ``\\u202e``). ``keep_newlines`` leaves line feeds alone, for a multi-line
    text (a traceback) that its caller lays out so no line of it can pass for one of its own.

    For display only: a backslash is left as it is, so an escape cannot be told from the same
    characters typed literally, and the exact data is what ``--json`` and the structured log
    attribute carry."""
    pattern = _UNSAFE_BUT_NEWLINE if keep_newlines else _UNSAFE
    return pattern.sub(_escape, text)


def _safe(value: Any) -> str:
    try:
        text = value if isinstance(value, str) else repr(value)
    except Exception:  # a foreign __repr__ must not break logging
        text = f"<{type(value).__qualname__} object>"
    return escape_controls(text)


def _to_record(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> tuple[Any, ...]:
    event = event_dict.pop("event", "")
    exc_info = event_dict.pop("exc_info", None)
    # Values come from task data (stream keys, error texts): one record stays one line, so none
    # can forge another record in a text log. The structured attribute keeps them exact.
    text = " ".join([_safe(event), *(f"{_safe(k)}={_safe(v)}" for k, v in event_dict.items())])
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

"""The dashboard's pages of the work itself: a stream's tasks (``/stream/<queue>?stream=``), paged
from its head, and one task found by its id (``/task/<queue>?id=``, with ``&key=`` or searched
across the queue's indexes).

A task's arguments are decoded with the backend's serializer, passed through the app's
``redact`` (by default ``redact_secrets``), written as a bounded Python repr (so control
characters show as escapes, whatever a producer put there) and cut to ``ARGS_CHARS``; the
template escapes what is left. A payload that cannot be decoded, or a ``redact`` that raises,
shows a note instead: never the raw bytes, never an error page.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..backend.work import WaitingTask
from ..engine.keys import queue_of, validate_queue_name
from ..errors import ConfigurationError, DecodeError
from ..functions import handle
from ..logs import escape_controls
from ..ops.render import shown_result
from ..serializers import Serializer
from ..task import DeadLetter, TaskRecord

if TYPE_CHECKING:
    from .app import Dashboard

#: ``redact(task name, args, kwargs) -> (args, kwargs)``: what a page may show of a task's
#: arguments. It gets the decoded values and returns what to show in their place.
Redactor = Callable[[str, list[Any], dict[str, Any]], tuple[Any, Any]]

#: Names of mapping keys whose values ``hide_secrets`` hides, matched anywhere in the name and
#: in any case: ``password``, ``X-Api-Key``, ``refresh_token``, ``Authorization``, ``session_cookie``.
SECRET_NAMES = re.compile(
    r"passw(or)?d|pwd|passphrase|token|secret|authori[sz]ation|api[-_]?key|private[-_]?key|credential|cookie",
    re.IGNORECASE,
)
#: Nesting ``hide_secrets`` follows; deeper values are replaced (``ARGS_REPR`` shows fewer levels).
MAX_DEPTH = 12
#: Values ``hide_secrets`` looks at, at most, in one task's arguments.
MAX_NODES = 5000
#: Characters of a task's arguments a page shows at most, and of the one-line summary.
ARGS_CHARS = 4000
SUMMARY_CHARS = 100
#: Characters of a request's stream name accepted (far beyond a valid one: older names too).
MAX_STREAM_PARAM = 1000
_OFFSET = re.compile(r"[0-9]{1,15}")


class _Hidden:
    """What a hidden value shows as: not a string, so it cannot be taken for the value itself."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


REDACTED: Any = _Hidden("<redacted>")
_TOO_DEEP: Any = _Hidden("<...>")


def _secret(key: object) -> bool:
    if isinstance(key, bytes):
        key = key.decode("latin-1")
    return isinstance(key, str) and SECRET_NAMES.search(key) is not None


def hide_secrets(value: Any, depth: int = 0, budget: list[int] | None = None) -> Any:
    """``value`` with every value named like a secret (``SECRET_NAMES``) replaced by
    ``REDACTED``, through nested mappings, lists and tuples: a mapping's value under such a key,
    the second of a ``(name, value)`` pair (headers as a list of pairs), and the ``value`` of a
    ``{"name": ..., "value": ...}`` mapping (form fields). Other values are kept as they are (a
    positional argument has no name to go by). It looks at ``MAX_NODES`` values at most, and
    shows what lies beyond as ``<...>``: its cost is bounded whatever the payload."""
    budget = [MAX_NODES] if budget is None else budget
    budget[0] -= 1
    if depth > MAX_DEPTH or budget[0] < 0:
        return _TOO_DEEP
    if isinstance(value, Mapping):
        named = _secret(value.get("name", value.get("key"))) and "value" in value
        return {
            k: REDACTED if _secret(k) or (named and k == "value") else hide_secrets(v, depth + 1, budget)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):  # a set holds no mapping: there is nothing to hide in one
        if len(value) == 2 and _secret(value[0]):
            hidden = [value[0], REDACTED]
        else:
            hidden = [hide_secrets(v, depth + 1, budget) for v in value]
        return hidden if isinstance(value, list) else tuple(hidden)
    return value


def redact_secrets(name: str, args: list[Any], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """The default ``redact``: ``hide_secrets`` over the positional and keyword arguments; a
    keyword argument named like a secret (``password=...``) is hidden too."""
    return hide_secrets(args), hide_secrets(kwargs)


def _bounded_repr() -> reprlib.Repr:
    """A repr that stops at a few levels and items: its cost follows what a page shows, not the
    size of the payload."""
    r = reprlib.Repr()
    r.maxlevel = 5
    r.maxtuple = r.maxlist = r.maxarray = r.maxdict = r.maxset = r.maxfrozenset = r.maxdeque = 30
    r.maxstring, r.maxlong, r.maxother = 400, 80, 200
    return r


ARGS_REPR = _bounded_repr()


class Arguments(NamedTuple):
    """A task's arguments as a page shows them: ``text`` (at most ``ARGS_CHARS``), ``length`` of
    the whole when that was cut, a one-line ``summary``; or only a ``problem``."""

    text: str = ""
    summary: str = ""
    length: int | None = None
    problem: str | None = None

    @property
    def short(self) -> bool:
        return self.length is None and len(self.text) <= SUMMARY_CHARS


def call_text(args: Any, kwargs: Any) -> str:
    """``(1, 'a', key=...)``: the arguments as a call writes them, each a bounded repr."""
    if not isinstance(args, list | tuple) or not isinstance(kwargs, Mapping):
        return ARGS_REPR.repr((args, kwargs))
    parts = [ARGS_REPR.repr(a) for a in args[: ARGS_REPR.maxlist]]
    if len(args) > ARGS_REPR.maxlist:
        parts.append(f"... {len(args) - ARGS_REPR.maxlist} more")
    for k, v in list(kwargs.items())[: ARGS_REPR.maxdict]:
        name = k if isinstance(k, str) and k.isidentifier() else ARGS_REPR.repr(k)
        parts.append(f"{name}={ARGS_REPR.repr(v)}")
    if len(kwargs) > ARGS_REPR.maxdict:
        parts.append(f"... {len(kwargs) - ARGS_REPR.maxdict} more keyword arguments")
    return f"({', '.join(parts)})"


def show_arguments(record: TaskRecord | None, problem: str | None, redact: Redactor) -> Arguments:
    """What a page shows of a task's arguments (see the module)."""
    if record is None:
        return Arguments(problem=escape_controls(f"cannot decode the arguments: {problem or 'unreadable'}")[:400])
    try:
        args, kwargs = redact(record.name, list(record.args), dict(record.kwargs))
        text = escape_controls(call_text(args, kwargs))
    except Exception as exc:  # a redact function of the application's: hide rather than fail
        return Arguments(problem=f"arguments hidden: the redact function raised {type(exc).__name__}")
    length = len(text) if len(text) > ARGS_CHARS else None
    summary = text[:SUMMARY_CHARS] + ("..." if len(text) > SUMMARY_CHARS else "")
    return Arguments(text[:ARGS_CHARS], summary, length)


def arguments_of(item: WaitingTask | DeadLetter, redact: Redactor, serializer: Serializer) -> Arguments:
    """``show_arguments`` of a waiting task or a dead letter."""
    if isinstance(item, WaitingTask):
        return show_arguments(item.record, item.problem, redact)
    problem = None
    if item.record is None:
        problem = "the dead letter holds no task entry" if item.entry is None else "not a task record"
        if item.entry is not None:
            try:
                TaskRecord.decode(item.entry.payload, serializer)
            except DecodeError as exc:
                problem = str(exc)
    return show_arguments(item.record, problem, redact)


# -- pages ----------------------------------------------------------------------------------------


def _queue(request: Request) -> str:
    try:
        return validate_queue_name(request.path_params["queue"])
    except ConfigurationError as exc:
        raise HTTPException(404, str(exc)) from None


def _stream(request: Request, queue: str) -> str:
    stream = request.query_params.get("stream", "").strip() or queue
    if len(stream) > MAX_STREAM_PARAM or queue_of(stream) != queue:
        raise HTTPException(400, f"stream: {stream[:40]!r} is not a stream of {queue}")
    return stream


def _offset(request: Request) -> int:
    value = request.query_params.get("offset", "0")
    if not _OFFSET.fullmatch(value):
        raise HTTPException(400, f"offset must be a whole number of at most 15 digits 0-9, not {value[:40]!r}")
    return int(value)


def routes(d: Dashboard) -> list[Route]:
    """The routes of these pages, each behind the dashboard's guard."""

    async def stream(request: Request) -> Response:
        queue = _queue(request)
        name, offset = _stream(request, queue), _offset(request)
        page = await run_in_threadpool(lambda: d.backend.admin.task_page(name, offset=offset))
        return await d.render(request, "stream.html", {"queue": queue, "page": page})

    async def task(request: Request) -> Response:
        """One task of the queue by its id (``?id=``, ``&key=`` for a keyed stream): its status."""
        queue = _queue(request)
        task_id = request.query_params.get("id", "").strip().lower()
        key = request.query_params.get("key", "").strip() or None
        try:
            found = handle(task_id, queue=queue, key=key, backend=d.backend)
        except ConfigurationError as exc:
            raise HTTPException(400, str(exc)) from None
        return await d.render(request, "task.html", await run_in_threadpool(_task_view, d, found, key))

    return [
        Route("/stream/{queue:path}", d.endpoint(stream), name="stream"),
        Route("/task/{queue:path}", d.endpoint(task), name="task"),
    ]


def _task_view(d: Dashboard, found: Any, key: str | None) -> dict[str, Any]:
    """The task page's data: its status (searched across the queue without a key), its result,
    and the offset of the stream page it leads when it is pending."""
    search = None if key is not None else d.backend.admin.find_task(found.queue, found.id)
    status = found.status() if search is None else search.status
    encoded = status.encoded_result
    result = None if encoded is None else shown_result(encoded, d.backend.settings.serializer)
    offset = None
    if status.state == "pending" and status.place is not None:
        offset = max(0, status.place - int(d.backend.queue_info(status.stream)["inflight"]))
    return {"queue": found.queue, "key": key, "status": status, "result": result, "search": search, "offset": offset}

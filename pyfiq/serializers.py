"""Task serializers: a two-method protocol with JSON (default), msgpack and pickle."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import pickle
import re
import threading
import uuid
from collections.abc import Callable
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Serializer(Protocol):
    """Turns a task record (a dict of plain values) into bytes and back.

    ``dumps`` raises ``TypeError``/``ValueError`` for values it cannot encode; ``loads`` raises
    any exception for bytes it cannot decode. pyfiq turns both into its own errors.
    """

    def dumps(self, obj: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


_TAG = "__pyfiq__"
#: The tag of an escaped user dict that would otherwise read as a tag: {"__pyfiq__": "dict",
#: "v": [[key, value], ...]} (pairs, so the escaped dict's own keys never reappear as keys).
_ESCAPED = "dict"


def _is_tag_shaped(obj: dict[str, Any]) -> bool:
    # The exact test today's decoder applied (a None tag reads as a plain dict), so records
    # stored before escaping existed decode as they always did.
    return len(obj) == 2 and "v" in obj and obj.get(_TAG) is not None


def _encode_extra(obj: Any) -> dict[str, str]:
    # datetime before date: a datetime is also a date.
    if isinstance(obj, dt.datetime):
        return {_TAG: "datetime", "v": obj.isoformat()}
    if isinstance(obj, dt.date):
        return {_TAG: "date", "v": obj.isoformat()}
    if isinstance(obj, dt.time):
        return {_TAG: "time", "v": obj.isoformat()}
    if isinstance(obj, decimal.Decimal):
        return {_TAG: "decimal", "v": str(obj)}
    if isinstance(obj, uuid.UUID):
        return {_TAG: "uuid", "v": str(obj)}
    if isinstance(obj, bytes | bytearray):
        return {_TAG: "bytes", "v": base64.b64encode(bytes(obj)).decode()}
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


_DECODERS: dict[str, Callable[[Any], Any]] = {
    "datetime": dt.datetime.fromisoformat,
    "date": dt.date.fromisoformat,
    "time": dt.time.fromisoformat,
    "decimal": decimal.Decimal,
    "uuid": uuid.UUID,
    "bytes": base64.b64decode,
    _ESCAPED: dict,
}


def _decode_extra(obj: dict[str, Any]) -> Any:
    if not _is_tag_shaped(obj):
        return obj
    tag = obj[_TAG]
    decoder = _DECODERS.get(tag) if isinstance(tag, str) else None
    if decoder is None:
        raise ValueError(f"unknown {_TAG} tag {tag!r}")
    return decoder(obj["v"])


class _BadKey(TypeError):
    def __init__(self, key: Any) -> None:
        super().__init__(key)
        self.key = key
        self.path: list[str | int] = []  # innermost step first, filled in while unwinding

    def __str__(self) -> str:
        where = ""
        for step in reversed(self.path):
            where += step if not where and isinstance(step, str) and step.isidentifier() else f"[{step!r}]"
        return (
            f"the dict at {where or 'the top level'} has key {self.key!r} of type {type(self.key).__name__};"
            " JSON object keys must be strings"
        )


def _escape(obj: Any) -> Any:
    """A copy of ``obj`` with tag-shaped user dicts escaped; ``_BadKey`` for a non-str key."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise _BadKey(k)
            try:
                out[k] = _escape(v)
            except _BadKey as exc:
                exc.path.append(k)
                raise
        return {_TAG: _ESCAPED, "v": [[k, v] for k, v in out.items()]} if _is_tag_shaped(out) else out
    if isinstance(obj, list | tuple):
        items = []
        for i, v in enumerate(obj):
            try:
                items.append(_escape(v))
            except _BadKey as exc:
                exc.path.append(i)
                raise
        return items
    return obj


# json's C encoder writes int, float, True, False and None keys as the strings below, silently.
# Only such a key (or a string key spelled the same) can produce this pattern in the output.
_KEY_NOT_STR = re.compile(r'"(?:[-0-9][0-9.e+-]*|true|false|null)":')
_TAG_KEY = f'"{_TAG}":'
_tags_emitted = threading.local()


def _counting_encode_extra(obj: Any) -> dict[str, str]:
    _tags_emitted.n += 1
    return _encode_extra(obj)


# One shared encoder: json.dumps with options would build a new JSONEncoder on every call.
_ENCODER = json.JSONEncoder(default=_counting_encode_extra, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
# And its C encoder made once, where json's encode() makes one per call (more than half of a
# small record's encoding time, measured). Shared, it cannot keep circular-reference markers
# (threads would see each other's): a cycle ends in RecursionError, reported as too deep.
_C_ENCODE = (
    None
    if c_make_encoder is None
    else c_make_encoder(None, _counting_encode_extra, encode_basestring, None, ":", ",", False, False, False)
)


_DECODER = json.JSONDecoder(object_hook=_decode_extra)


class JSONSerializer:
    """JSON that also round-trips datetime, date, time, Decimal, UUID and bytes.

    Tuples come back as lists, as in any JSON encoding. Dict keys must be strings (JSON would
    turn ``1`` into ``"1"``); a user dict that looks like one of the type tags is escaped.
    """

    def dumps(self, obj: Any) -> bytes:
        # The C encoder runs first, unchanged; the output tells whether the Python walk is
        # needed: each tag the encoder emitted writes one "__pyfiq__" key, so any more came
        # from user dicts, and a non-str key can only come out looking like _KEY_NOT_STR.
        # False alarms (a str key "1") only cost the walk. Saved and restored so that an
        # encode nested in this thread (a signal handler) cannot mix its count into ours.
        outer = getattr(_tags_emitted, "n", 0)
        _tags_emitted.n = 0
        try:
            text = self._encode(obj)
            if text.count(_TAG_KEY) != _tags_emitted.n or _KEY_NOT_STR.search(text) is not None:
                text = self._encode(_escape(obj))
        except RecursionError:
            # As a ValueError, TaskRecord.encode reports it as a SerializationError.
            raise ValueError("the value is nested too deeply to encode") from None
        finally:
            _tags_emitted.n = outer
        return text.encode()

    @staticmethod
    def _encode(obj: Any) -> str:
        try:
            if _C_ENCODE is not None and isinstance(obj, dict):
                return "".join(_C_ENCODE(obj, 0))
            return _ENCODER.encode(obj)
        except TypeError:
            # The encoder's message for a tuple (or other) key does not say where it is.
            try:
                _escape(obj)
            except _BadKey as bad:
                raise bad from None
            except RecursionError:
                pass
            raise

    def loads(self, data: bytes) -> Any:
        # Payloads are the UTF-8 that dumps writes; json.loads would build a decoder per call.
        return _DECODER.decode(data.decode("utf-8"))


class MsgpackSerializer:
    """msgpack (``pip install pyfiq[msgpack]``): compact, binary-safe, no custom types.

    Dict keys of any type msgpack packs (str, bytes, int, float, bool, None, tuples of them)
    round-trip; tuples elsewhere come back as lists.
    """

    def __init__(self) -> None:
        import msgpack  # optional dependency

        self._msgpack = msgpack

    def dumps(self, obj: Any) -> bytes:
        return bytes(self._msgpack.packb(obj, use_bin_type=True))

    def loads(self, data: bytes) -> Any:
        # msgpack keeps the types of int, float, bool, None and bytes keys, so they round-trip;
        # strict_map_key=True would accept them at enqueue and then fail at the worker.
        try:
            return self._msgpack.unpackb(data, raw=False, strict_map_key=False)
        except TypeError:
            # A tuple key was packed as an array and comes back as an unhashable list.
            return self._msgpack.unpackb(data, raw=False, strict_map_key=False, object_pairs_hook=_tuple_keys)


def _as_tuple(key: Any) -> Any:
    return tuple(_as_tuple(k) for k in key) if isinstance(key, list) else key


def _tuple_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    return {_as_tuple(k): v for k, v in pairs}


class PickleSerializer:
    """pickle: any picklable argument. Only for Redis that no untrusted party can write to,
    since unpickling runs code. Never a default; choose it explicitly."""

    def dumps(self, obj: Any) -> bytes:
        try:
            return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, AttributeError) as exc:
            raise TypeError(str(exc)) from exc

    def loads(self, data: bytes) -> Any:
        return pickle.loads(data)  # noqa: S301 - explicitly chosen by the application

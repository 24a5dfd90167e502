"""Task serializers: a two-method protocol with JSON (default), msgpack and pickle."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import pickle
import uuid
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


_DECODERS = {
    "datetime": dt.datetime.fromisoformat,
    "date": dt.date.fromisoformat,
    "time": dt.time.fromisoformat,
    "decimal": decimal.Decimal,
    "uuid": uuid.UUID,
    "bytes": base64.b64decode,
}


def _decode_extra(obj: dict[str, Any]) -> Any:
    tag = obj.get(_TAG)
    if tag is None or len(obj) != 2 or "v" not in obj:
        return obj
    return _DECODERS[tag](obj["v"])


class JSONSerializer:
    """JSON that also round-trips datetime, date, time, Decimal, UUID and bytes.

    Tuples come back as lists, as in any JSON encoding.
    """

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(
            obj, default=_encode_extra, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data, object_hook=_decode_extra)


class MsgpackSerializer:
    """msgpack (``pip install pyfiq[msgpack]``): compact, binary-safe, no custom types."""

    def __init__(self) -> None:
        import msgpack  # optional dependency

        self._msgpack = msgpack

    def dumps(self, obj: Any) -> bytes:
        return bytes(self._msgpack.packb(obj, use_bin_type=True))

    def loads(self, data: bytes) -> Any:
        return self._msgpack.unpackb(data, raw=False)


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

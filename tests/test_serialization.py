"""Serializers and the stored task encoding (pure unit tests, no Redis)."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid

import pytest

from pyfiq import DecodeError, JSONSerializer, MsgpackSerializer, PickleSerializer, SerializationError
from pyfiq.task import Entry, TaskRecord


def test_json_round_trips_the_common_non_json_types() -> None:
    value = {
        "when": dt.datetime(2026, 1, 2, 3, 4, 5, 6789, tzinfo=dt.timezone.utc),
        "naive": dt.datetime(2026, 1, 2, 3, 4, 5),
        "day": dt.date(2026, 2, 28),
        "at": dt.time(13, 37),
        "amount": decimal.Decimal("12.3400"),
        "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "blob": b"\x00\xffraw",
        "nested": [{"x": decimal.Decimal("1")}],
        "unicode": "ordre établi",
    }
    s = JSONSerializer()
    assert s.loads(s.dumps(value)) == value


def test_json_leaves_ordinary_dicts_that_look_tagged_alone() -> None:
    s = JSONSerializer()
    plain = {"__pyfiq__": "datetime", "v": "x", "other": 1}
    assert s.loads(s.dumps(plain)) == plain


@pytest.mark.parametrize("bad", [object(), {1, 2}, float("nan")])
def test_task_record_refuses_unserializable_arguments_with_a_clear_error(bad: object) -> None:
    with pytest.raises(SerializationError, match=r"cannot serialize the arguments of task 'billing\.charge'"):
        TaskRecord("billing.charge", [bad], {}).encode(JSONSerializer())


@pytest.mark.parametrize("serializer", [JSONSerializer(), MsgpackSerializer(), PickleSerializer()])
def test_record_round_trip_with_each_serializer(serializer) -> None:  # type: ignore[no-untyped-def]
    record = TaskRecord("m.f", [1, "two", [3]], {"k": {"n": None}}, key="c-1")
    assert TaskRecord.decode(record.encode(serializer), serializer) == record


def test_pickle_refuses_unpicklable_arguments_as_serialization_error() -> None:
    with pytest.raises(SerializationError):
        TaskRecord("m.f", [lambda: None], {}).encode(PickleSerializer())


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"\x80\x81", "cannot decode"),
        (b"[1, 2]", "not a pyfiq task record"),
        (b'{"v": 99, "name": "x", "args": []}', "newer than this replica"),
        (b'{"v": 1, "name": "x", "args": {}}', "malformed args"),
    ],
)
def test_decode_errors_name_what_is_wrong(payload: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        TaskRecord.decode(payload, JSONSerializer())


def test_entry_parses_header_and_keeps_binary_payload_intact() -> None:
    raw = b"a" * 32 + b"|1700000000000|0|" + b"\x00|\n\xff"
    e = Entry.parse(raw)
    assert (e.id, e.enqueued_ms, e.expires_ms, e.payload) == ("a" * 32, 1700000000000, 0, b"\x00|\n\xff")
    with pytest.raises(DecodeError, match="malformed task entry"):
        Entry.parse(b"garbage")

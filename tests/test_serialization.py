"""Serializers and the stored task encoding (pure unit tests, no Redis)."""

from __future__ import annotations

import datetime as dt
import decimal
import functools
import threading
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pyfiq
from pyfiq import (
    DecodeError,
    JSONSerializer,
    MsgpackSerializer,
    PickleSerializer,
    RedisQueueBackend,
    SerializationError,
    ThreadedWorker,
    fifo,
)
from pyfiq.task import Entry, TaskRecord
from tests.support.helpers import FAST, unique_prefix, wait_until


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


def _cycle() -> list[Any]:
    loop: list[Any] = []
    loop.append({"again": loop})
    return loop


@pytest.mark.parametrize("make", [_cycle, lambda: functools.reduce(lambda inner, _: [inner], range(100_000), [])])
def test_json_refuses_cyclic_and_very_deep_arguments_with_a_clear_error(make: Any) -> None:
    """The shared C encoder keeps no circular-reference markers (threads would share them): a
    cycle is refused like a structure too deep to encode, never a crash or a hang."""
    with pytest.raises(SerializationError, match="nested too deeply"):
        TaskRecord("billing.charge", [make()], {}).encode(JSONSerializer())


@pytest.mark.parametrize("serializer", [JSONSerializer(), MsgpackSerializer(), PickleSerializer()])
def test_record_round_trip_with_each_serializer(serializer) -> None:  # type: ignore[no-untyped-def]
    record = TaskRecord("m.f", [1, "two", [3]], {"k": {"n": None}}, key="c-1")
    assert TaskRecord.decode(record.encode(serializer), serializer) == record
    traced = TaskRecord("m.f", [], {}, headers={"traceparent": "00-ab-cd-01"})
    assert TaskRecord.decode(traced.encode(serializer), serializer) == traced


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
        (b'{"v": 1, "name": "x", "args": [], "h": {"traceparent": 1}}', "malformed headers"),
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


# Dicts a user may pass that the JSON encoding would otherwise read as its own type tags.
TAG_LOOKING: list[dict[str, Any]] = [
    {"__pyfiq__": "bytes", "v": "aGVsbG8="},
    {"__pyfiq__": "note", "v": "hi"},
    {"v": "2026-01-02", "__pyfiq__": "date"},
    {"__pyfiq__": "dict", "v": [["a", 1]]},
    {"__pyfiq__": ["bytes"], "v": 1},
    {"__pyfiq__": None, "v": 1},
    {"__pyfiq__": "uuid", "v": {"__pyfiq__": "decimal", "v": "NaN-ish"}},
]


@pytest.mark.parametrize("value", TAG_LOOKING)
def test_json_round_trips_user_dicts_that_look_like_tags(value: dict[str, Any]) -> None:
    s = JSONSerializer()
    back = s.loads(s.dumps(value))
    assert back == value
    assert list(back) == list(value)


@pytest.mark.parametrize("value", TAG_LOOKING)
def test_tag_looking_dicts_round_trip_at_any_depth_in_args_and_kwargs(value: dict[str, Any]) -> None:
    record = TaskRecord(
        "m.f",
        [value, [{"deep": [value]}], dt.date(2026, 1, 2)],
        {"k": value, "nested": {"x": [value, {"__pyfiq__": "bytes", "v": value}]}},
    )
    assert TaskRecord.decode(record.encode(JSONSerializer()), JSONSerializer()) == record


def test_string_keys_that_look_like_numbers_or_constants_round_trip() -> None:
    s = JSONSerializer()
    value = {"1": "a", "-0.5e+3": 1, "true": 2, "false": 3, "null": 4, 'x"__pyfiq__': {"v": b"\x00"}}
    assert s.loads(s.dumps(value)) == value


@pytest.mark.parametrize(
    ("args", "kwargs", "where"),
    [
        ([{1: "a"}], {}, r"the dict at args\[0\] has key 1 of type int"),
        ([{"a": {1.5: "x"}}], {}, r"the dict at args\[0\]\['a'\] has key 1\.5 of type float"),
        ([[0, {True: 1}]], {}, r"the dict at args\[0\]\[1\] has key True of type bool"),
        ([], {"x": [{"y": {None: 1}}]}, r"the dict at kwargs\['x'\]\[0\]\['y'\] has key None of type NoneType"),
        ([], {"x": {(1, 2): "a"}}, r"the dict at kwargs\['x'\] has key \(1, 2\) of type tuple"),
        ([{"1": "a", 1: "b"}], {}, r"the dict at args\[0\] has key 1 of type int"),
    ],
)
def test_json_refuses_non_string_dict_keys_at_enqueue_and_says_where(
    args: list[Any], kwargs: dict[str, Any], where: str
) -> None:
    with pytest.raises(SerializationError, match=rf"task 'm\.f' with JSONSerializer: {where}; JSON object keys"):
        TaskRecord("m.f", args, kwargs).encode(JSONSerializer())


def test_msgpack_round_trips_non_string_dict_keys() -> None:
    s = MsgpackSerializer()
    keyed = {1: "a", "1": "b", -2.5: "c", False: "d", None: "e", b"raw": "f", (1, (2, "x")): "g"}
    record = TaskRecord("m.f", [keyed, [{7: {(3,): [keyed]}}]], {"k": keyed})
    assert TaskRecord.decode(record.encode(s), s) == record


def test_json_decodes_records_stored_before_tags_were_escaped() -> None:
    stored = (
        b'{"v":1,"name":"m.f","args":['
        b'{"__pyfiq__":"datetime","v":"2026-01-02T03:04:05.006789+00:00"},'
        b'{"__pyfiq__":"date","v":"2026-02-28"},{"__pyfiq__":"time","v":"13:37:00"},'
        b'{"__pyfiq__":"decimal","v":"12.3400"},'
        b'{"__pyfiq__":"uuid","v":"12345678-1234-5678-1234-567812345678"},'
        b'{"__pyfiq__":"bytes","v":"AP9yYXc="},'
        b'{"__pyfiq__":"datetime","v":"x","other":1},{"__pyfiq__":null,"v":1},{"__pyfiq__":"bytes"}'
        b'],"kwargs":{"k":{"__pyfiq__":"decimal","v":"1"}}}'
    )
    assert TaskRecord.decode(stored, JSONSerializer()) == TaskRecord(
        "m.f",
        [
            dt.datetime(2026, 1, 2, 3, 4, 5, 6789, tzinfo=dt.timezone.utc),
            dt.date(2026, 2, 28),
            dt.time(13, 37),
            decimal.Decimal("12.3400"),
            uuid.UUID("12345678-1234-5678-1234-567812345678"),
            b"\x00\xffraw",
            {"__pyfiq__": "datetime", "v": "x", "other": 1},
            {"__pyfiq__": None, "v": 1},
            {"__pyfiq__": "bytes"},
        ],
        {"k": decimal.Decimal("1")},
    )


def test_json_keeps_the_stored_form_of_ordinary_records() -> None:
    """Replicas still on the previous release read what this one writes (rolling deploys)."""
    value = {"a": [1, "x", {"b": None}], "t": dt.date(2026, 1, 2), "1": True}
    assert JSONSerializer().dumps(value) == (
        b'{"a":[1,"x",{"b":null}],"t":{"__pyfiq__":"date","v":"2026-01-02"},"1":true}'
    )


def test_json_names_an_unknown_tag_in_a_corrupt_record() -> None:
    with pytest.raises(DecodeError, match="unknown __pyfiq__ tag 'note'"):
        TaskRecord.decode(b'{"v":1,"name":"m.f","args":[{"__pyfiq__":"note","v":"hi"}]}', JSONSerializer())


_KEYS = st.sampled_from(["__pyfiq__", "v", "1", "null", "dict", 'q"__pyfiq__']) | st.text(max_size=4)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.sampled_from(["datetime", "bytes", "dict", "note", "aGVsbG8=", "2026-01-02"])
    | st.binary(max_size=8)
    | st.datetimes(timezones=st.none() | st.just(dt.timezone.utc))
    | st.dates()
    | st.times()
    | st.decimals(allow_nan=False)
    | st.uuids()
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(_KEYS, inner, max_size=3)
        | st.fixed_dictionaries({"__pyfiq__": inner, "v": inner})
    ),
    max_leaves=12,
)


@given(_VALUES)
def test_every_value_json_accepts_round_trips_exactly(value: Any) -> None:
    s = JSONSerializer()
    assert s.loads(s.dumps(value)) == value


def test_a_tag_looking_argument_reaches_the_task_unchanged_through_a_worker() -> None:
    backend = RedisQueueBackend(f"memory://{uuid.uuid4().hex}", prefix=unique_prefix(), **FAST)
    q = f"q-{uuid.uuid4().hex[:8]}"
    seen: list[tuple[Any, Any]] = []
    done = threading.Event()

    @fifo(queue=q, name=f"{q}.take")
    def take(arg: Any, *, opt: Any) -> None:
        seen.append((arg, opt))
        done.set()

    arg = [{"__pyfiq__": "bytes", "v": "aGVsbG8="}, {"__pyfiq__": "note", "v": "hi"}]
    opt = {"deep": {"__pyfiq__": "datetime", "v": "2026-01-02T00:00:00"}}
    pyfiq.configure(backend)
    worker = ThreadedWorker(backend, queues=[q]).start()
    try:
        take(arg, opt=opt)
        wait_until(done.is_set, message="the task ran")
        assert backend.dead_letters(q) == []
    finally:
        worker.stop(timeout=5)
        backend.close()
    assert seen == [(arg, opt)]

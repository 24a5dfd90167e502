"""Stream keys are bounded like queue names, and refused before anything is stored: at most
200 characters and 512 bytes of UTF-8, no control characters. The per-process cache of key
names is bounded in entries and holds no name longer than a valid stream's, so what it keeps
is bounded in bytes whatever names it is asked about."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest

import pyfiq
from pyfiq import ConfigurationError, RedisQueueBackend, fifo
from tests.support.helpers import unique_prefix

#: The bounds docs/guide/streams.md states.
MAX_KEY_CHARS, MAX_KEY_BYTES = 200, 512


@pytest.fixture
def backend(redis_server: Any) -> Iterator[RedisQueueBackend]:
    b = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), shards=2)
    pyfiq.configure(b)
    yield b
    b.close()


@fifo(queue="keyed-bounds", name="tests.keys.deliver", key=lambda event: event["customer"])
def deliver(event: dict[str, Any]) -> None:
    pass


def stored(backend: RedisQueueBackend) -> list[bytes]:
    return list(backend.client.scan_iter(f"{backend.keys.prefix}:*{{s*}}:q:*"))


REFUSED = {
    "201 characters": "k" * 201,
    "64 KB": "k" * 65_536,
    "513 bytes of UTF-8 in 129 characters": "\U0001f600" * 128 + "k",
    "an escape": "c-1\x1b]0;owned\x07",
    "a line break": "c-1\n2026-01-01 00:00:00 [error    ] forged",
    "a carriage return": "c-1\r",
    "a C1 control": "c-1\x9b2K",
    "DEL": "c-1\x7f",
    "NUL": "c-1\x00",
    "a lone surrogate": "c-1\ud800",
}


@pytest.mark.parametrize("key", REFUSED.values(), ids=REFUSED.keys())
def test_a_bad_key_is_refused_at_the_call_and_nothing_is_stored(backend: RedisQueueBackend, key: str) -> None:
    with pytest.raises(ConfigurationError, match="stream key") as info:
        deliver({"customer": key})
    assert isinstance(info.value, ValueError) and "nothing was enqueued" in str(info.value)
    assert len(str(info.value)) < 400, "the message shows the key shortened"
    with pytest.raises(ConfigurationError, match="stream key"):
        deliver.send_with_options(args=({"customer": "ok"},), key=key)
    with pytest.raises(ConfigurationError, match="stream key"):
        asyncio.run(deliver.asend_with_options(args=({"customer": "ok"},), key=key))
    with pytest.raises(ConfigurationError, match="stream key"):
        deliver.enqueue_many([({"customer": "fine"},), ({"customer": key},)])
    assert stored(backend) == []


def test_keys_up_to_the_bounds_are_taken(backend: RedisQueueBackend) -> None:
    longest = ["k" * MAX_KEY_CHARS, "\U0001f600" * (MAX_KEY_BYTES // 4), "Ünïcödé kéy with spaces #and hash"]
    for key in longest:
        handle = deliver({"customer": key})
        assert handle.stream == f"keyed-bounds#{key}"
    handles = deliver.enqueue_many([({"customer": key},) for key in longest])
    assert [backend.queue_info(h.stream)["pending"] for h in handles] == [2, 2, 2]


def _kept(make_names: Any) -> int:
    """Bytes still allocated after ``make_names()`` returned (what the cache kept)."""
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        make_names()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    return sum(stat.size_diff for stat in after.compare_to(before, "filename"))


def test_the_key_cache_keeps_a_bounded_amount_of_memory(backend: RedisQueueBackend) -> None:
    keys = backend.keys
    # 100 distinct 64 KB names, as a tool reading whatever streams Redis holds might ask about.
    kept = _kept(lambda: [keys.stream(f"q#{i}" + "k" * 65_536) for i in range(100)])
    assert kept < 1_000_000, f"{kept} bytes kept for names no valid stream has"
    # 5,000 of the longest valid names: only a small number of entries is kept.
    longest = "q" * 200 + "#" + "k" * MAX_KEY_CHARS
    kept = _kept(lambda: [keys.stream(f"{i:05d}{longest[5:]}") for i in range(5000)])
    assert kept < 8_000_000, f"{kept} bytes kept for 5,000 streams"
    assert keys.stream("q#c-1") is keys.stream("q#c-1"), "valid names are cached"


def test_a_queue_name_ending_in_a_line_break_is_refused() -> None:
    # A "$" anchor also matches before a final newline: "billing\n" was taken as a queue name.
    with pytest.raises(ConfigurationError):
        fifo(queue="billing\n", name="tests.keys.newline")


@pytest.mark.parametrize("key", [REFUSED[k] for k in ("a line break", "64 KB", "NUL")], ids=["newline", "64KB", "NUL"])
def test_pausing_a_stream_bounds_its_key_as_an_enqueue_does(backend: RedisQueueBackend, key: str) -> None:
    """A pause or a resume writes the stream's name into Redis: the CLI's and the dashboard's
    take only a key an enqueue could make (before: any string reached Redis)."""
    from pyfiq.dashboard import actions

    with pytest.raises(ConfigurationError):
        backend.pause("keyed-bounds", key, wait=0)
    with pytest.raises(ConfigurationError):
        backend.resume("keyed-bounds", key)
    for name in ("pause", "resume"):
        with pytest.raises((ValueError, ConfigurationError)):
            actions.parse(name, [("queue", "keyed-bounds"), ("stream", f"keyed-bounds#{key}")])
    assert backend.paused() == []

"""A task larger than ``Settings.max_payload_bytes`` is refused at the call, naming its size and
the limit, and nothing of its call is enqueued (a 50 MB argument used to be stored silently,
and a 600 MB one reported Redis as unreachable)."""

from __future__ import annotations

import uuid

import pytest

from pyfiq import ConfigurationError, PayloadTooLargeError, RedisQueueBackend, Settings
from pyfiq.functions import Registry


def qname() -> str:
    return f"payload-{uuid.uuid4().hex[:8]}"


def test_a_task_over_the_limit_is_refused_at_the_call_and_nothing_is_enqueued(
    redis_backend: RedisQueueBackend,
) -> None:
    registry, q = Registry(), qname()
    backend = RedisQueueBackend(redis_backend.url, prefix=redis_backend.keys.prefix, max_payload_bytes=10_000)
    registry.configure(backend)

    @registry.fifo(queue=q, name=f"{q}.upload")
    def upload(blob: str) -> None: ...

    with pytest.raises(PayloadTooLargeError) as caught:
        upload("x" * 20_000)
    message = str(caught.value)
    assert f"{q}.upload" in message and "20,0" in message and "10,000" in message, message
    assert isinstance(caught.value, ValueError)
    with pytest.raises(PayloadTooLargeError):
        upload.enqueue_many([("small",), ("y" * 20_000,), ("small too",)])
    assert backend.queue_info(q)["pending"] == 0, "nothing of the call or of the batch was enqueued"
    upload("z" * 9_000)
    assert backend.queue_info(q)["pending"] == 1, "under the limit, it goes"
    backend.close()


def test_the_default_limit_is_one_mebibyte_and_none_lifts_it(redis_backend: RedisQueueBackend) -> None:
    assert Settings().max_payload_bytes == 1_048_576
    registry, q = Registry(), qname()
    big = "b" * 1_100_000
    registry.configure(redis_backend)

    @registry.fifo(queue=q, name=f"{q}.big")
    def store(blob: str) -> None: ...

    with pytest.raises(PayloadTooLargeError):
        store(big)
    unlimited = RedisQueueBackend(redis_backend.url, prefix=redis_backend.keys.prefix, max_payload_bytes=None)
    registry.configure(unlimited)
    store(big)
    assert unlimited.queue_info(q)["pending"] == 1
    unlimited.close()
    with pytest.raises(ConfigurationError, match="max_payload_bytes"):
        Settings(max_payload_bytes=0)


def test_a_key_function_that_raises_or_returns_none_names_the_task_and_the_function(
    redis_backend: RedisQueueBackend,
) -> None:
    registry, q = Registry(), qname()
    registry.configure(redis_backend)

    def customer_of(event: dict[str, str]) -> str | None:
        return event.get("customer_id")

    def strict_customer(event: dict[str, str]) -> str:
        return event["customer_id"]

    @registry.fifo(queue=q, name=f"{q}.deliver", key=customer_of)
    def deliver(event: dict[str, str]) -> None: ...

    @registry.fifo(queue=q, name=f"{q}.strict", key=strict_customer)
    def deliver_strict(event: dict[str, str]) -> None: ...

    @registry.fifo(queue=q, name=f"{q}.lenient", key=customer_of, allow_none_key=True)
    def deliver_lenient(event: dict[str, str]) -> None: ...

    with pytest.raises(ConfigurationError, match=f"customer_of of task {q}.deliver returned None"):
        deliver({"type": "ping"})
    with pytest.raises(ConfigurationError, match=f"strict_customer of task {q}.strict raised KeyError") as caught:
        deliver_strict({"type": "ping"})
    assert isinstance(caught.value.__cause__, KeyError)
    with pytest.raises(ConfigurationError, match="returned None"):
        deliver.enqueue_many([({"customer_id": "c-1"},), ({"type": "ping"},)])
    assert not [s for s in redis_backend.active_streams() if s.startswith(q)], "nothing of either call was enqueued"
    deliver_lenient({"type": "ping"})
    deliver({"customer_id": "c-1"})
    assert sorted(s for s in redis_backend.active_streams() if s.startswith(q)) == [q, f"{q}#c-1"]

"""Checked by mypy in ``test_typing.py``, never run: what ``@fifo`` gives a typed caller."""

from __future__ import annotations

from typing import assert_type

from pyfiq import TaskHandle, fifo


@fifo(queue="typed", store_result=True)
def total(prices: list[float], discount: float = 0.0) -> float:
    return sum(prices) * (1 - discount)


@fifo(queue="typed", store_result=True)
async def fetch(url: str) -> bytes:
    return url.encode()


def sync_caller() -> None:
    handle = total.send_with_options(args=([1.0, 2.0],))
    assert_type(handle, TaskHandle[float])
    assert_type(handle.result(timeout=5), float)
    assert_type(total.handle("0" * 32).result(), float)
    assert_type(fetch.send_with_options(args=("https://example.com",)).result(), bytes)


async def async_caller() -> None:
    handle = await fetch.aenqueue("https://example.com")
    assert_type(handle, TaskHandle[bytes])
    assert_type(await handle.aresult(timeout=5), bytes)
    assert_type(await (await total.aenqueue([1.0])).aresult(), float)

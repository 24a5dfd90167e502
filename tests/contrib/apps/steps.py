"""The task of the framework test apps: one step of an ordered stream, journaled in Redis as
``stream:seq:pid`` so that a test sees the order per stream and which process ran each step."""

from __future__ import annotations

import os
import time

import redis

QUEUE = "jobs"
NAME = "apps.step"


def journal_key(prefix: str) -> str:
    return f"{prefix}:journal"


def run_step(url: str, prefix: str, stream: str, seq: int, seconds: float) -> None:
    time.sleep(seconds)
    # A client per call: nothing of it exists before the process that runs the step.
    client = redis.Redis.from_url(url)
    try:
        client.rpush(journal_key(prefix), f"{stream}:{seq}:{os.getpid()}")
    finally:
        client.close()


def read_journal(url: str, prefix: str) -> list[tuple[str, int, int]]:
    client = redis.Redis.from_url(url)
    try:
        rows = [e.decode().split(":") for e in client.lrange(journal_key(prefix), 0, -1)]
    finally:
        client.close()
    return [(stream, int(seq), int(pid)) for stream, seq, pid in rows]

"""A FastAPI app whose lifespan runs an AsyncWorker (``pyfiq_lifespan``) and mounts the
dashboard; ``POST /steps/{stream}/{seq}`` enqueues a step of an ordered stream. Configured from
the environment: APP_REDIS_URL, APP_PREFIX, APP_STEP_SECONDS."""

from __future__ import annotations

import os

from fastapi import FastAPI
from steps import NAME, QUEUE, run_step

from pyfiq import RedisQueueBackend, fifo
from pyfiq.contrib.asgi import pyfiq_lifespan

URL, PREFIX = os.environ["APP_REDIS_URL"], os.environ["APP_PREFIX"]
SECONDS = float(os.environ.get("APP_STEP_SECONDS", "0.01"))

backend = RedisQueueBackend(URL, prefix=PREFIX, shards=4, lease_ttl=6.0, poll_interval=0.2)


@fifo(queue=QUEUE, name=NAME, key=lambda stream, seq: stream)
def step(stream: str, seq: int) -> None:
    run_step(URL, PREFIX, stream, seq, SECONDS)


app = FastAPI(lifespan=pyfiq_lifespan(backend, concurrency=2, stop_timeout=5, dashboard="/pyfiq"))


@app.post("/steps/{stream}/{seq}")
async def enqueue(stream: str, seq: int) -> dict[str, object]:
    handle = await step.aenqueue(stream, seq)
    return {"task": handle.id, "pid": os.getpid()}

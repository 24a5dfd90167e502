"""A FastAPI app that enqueues ordered webhook deliveries and runs an AsyncWorker in its lifespan
(``pyfiq_lifespan``).

    pip install "pyfiq[examples]"      # FastAPI and uvicorn[standard]
    PYFIQ_REDIS_URL=redis://localhost:6379/0 uvicorn examples.fastapi_app:app

Without PYFIQ_REDIS_URL it uses the embedded memory:// backend. uvicorn's standard extra brings
uvloop and httptools; on the plain asyncio loop keep-alive requests wait tens of milliseconds.
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from pydantic import BaseModel

from pyfiq import RedisQueueBackend, current_task, fifo
from pyfiq.contrib.asgi import pyfiq_lifespan

backend = RedisQueueBackend(os.environ.get("PYFIQ_REDIS_URL", "memory://fastapi-example"))

#: What the example's task did, in order (a real app would call the customer's endpoint).
delivered: list[dict[str, object]] = []


@fifo(queue="webhooks", name="examples.deliver_webhook", key=lambda event: event["customer_id"])
async def deliver_webhook(event: dict[str, object]) -> None:
    task = current_task()
    delivered.append({**event, "task_id": task.id, "fencing_token": task.fencing_token})


# The worker starts with the app and stops with it (running tasks finish, leases are handed
# over), in each process uvicorn serves the app from; the backend is the @fifo functions' now.
app = FastAPI(lifespan=pyfiq_lifespan(backend, concurrency=8))


class Event(BaseModel):
    customer_id: str
    kind: str
    seq: int


@app.post("/events", status_code=202)
async def post_event(event: Event) -> dict[str, str]:
    handle = await deliver_webhook(event.model_dump())
    return {"task_id": handle.id, "stream": handle.stream}


@app.get("/delivered")
async def get_delivered() -> list[dict[str, object]]:
    return delivered

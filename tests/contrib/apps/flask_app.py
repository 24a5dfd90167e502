"""A Flask app that enqueues a step of an ordered stream per request (``POST /steps/<stream>/<seq>``),
configured through ``app.config`` from the environment: APP_REDIS_URL, APP_PREFIX, APP_WORKER
("embedded" runs a worker in each serving process), APP_STEP_SECONDS."""

from __future__ import annotations

import os

from flask import Flask
from steps import NAME, QUEUE, run_step

from pyfiq import fifo
from pyfiq.contrib.flask import PyfiqExtension

URL, PREFIX = os.environ["APP_REDIS_URL"], os.environ["APP_PREFIX"]
SECONDS = float(os.environ.get("APP_STEP_SECONDS", "0.01"))

app = Flask(__name__)
app.config.update(
    PYFIQ_URL=URL,
    PYFIQ_PREFIX=PREFIX,
    PYFIQ_SHARDS=4,
    PYFIQ_LEASE_TTL=6.0,
    PYFIQ_POLL_INTERVAL=0.2,
    PYFIQ_WORKER=os.environ.get("APP_WORKER") or None,
    PYFIQ_CONCURRENCY=2,
    PYFIQ_STOP_TIMEOUT=5.0,
)
pyfiq_ext = PyfiqExtension(app)


@fifo(queue=QUEUE, name=NAME, key=lambda stream, seq: stream)
def step(stream: str, seq: int) -> None:
    run_step(URL, PREFIX, stream, seq, SECONDS)


@app.post("/steps/<stream>/<int:seq>")
def enqueue(stream: str, seq: int) -> dict[str, object]:
    return {"task": step(stream, seq).id, "pid": os.getpid()}

"""The project's tasks (imported by pyfiq's AUTODISCOVER at startup, as an app's would be).

``record`` runs on a worker and writes to a journal (a Redis list) whether it found its order:
a task sent before its transaction committed would not. No worker consumes ``held``: what its
streams hold in Redis shows what was sent, and in which order."""

import json
import os
import threading

import redis
from django.conf import settings
from django.db import connection

from pyfiq import current_task, fifo

from .models import Order


def journal(entry: dict[str, object]) -> None:
    client = redis.Redis.from_url(settings.PYFIQ["URL"])
    try:
        client.rpush(f"{settings.PYFIQ['PREFIX']}:journal", json.dumps(entry))
    finally:
        client.close()


@fifo(queue="orders", name="shop.record")
def record(order_id: int, label: str) -> None:
    found = Order.objects.filter(pk=order_id).exists()
    backend_pid = None
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            backend_pid = cursor.fetchone()[0]
    task = current_task()
    journal(
        {
            "label": label,
            "order": order_id,
            "found": found,
            "id": task.id,
            "pid": os.getpid(),
            "replica": task.replica,
            "thread": threading.get_ident(),
            "db_pid": backend_pid,
        }
    )


@fifo(queue="held", name="shop.held", key=lambda scenario, label: scenario)
def held(scenario: str, label: str) -> None:
    raise AssertionError("no worker consumes the held queue")

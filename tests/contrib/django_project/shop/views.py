import json
import os

from django.db import transaction
from django.http import HttpRequest, HttpResponse

from pyfiq.contrib.django import embedded_worker

from .models import Order
from .tasks import record


def order(request: HttpRequest) -> HttpResponse:
    with transaction.atomic():
        placed = Order.objects.create(note="gunicorn")
        handle = record(placed.id, request.GET.get("label", "view"))
    embedded = embedded_worker()
    worker = embedded.worker if embedded is not None else None
    body = {"pid": os.getpid(), "task": handle.id, "replica": worker.replica if worker is not None else None}
    return HttpResponse(json.dumps(body), content_type="application/json")

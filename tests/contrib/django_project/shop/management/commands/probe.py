"""``manage.py probe``: with ``EMBEDDED_WORKER``, whether a worker runs in this process after
``migrate`` ran in it, and after the process served a request (Django's ``request_started``):
only a process that serves requests starts one."""

import json
import threading
from typing import Any

from django.core.management import call_command
from django.core.management.base import BaseCommand
from django.core.signals import request_started

import pyfiq
from pyfiq.contrib.django import embedded_worker
from pyfiq.functions import default_registry


def state() -> dict[str, Any]:
    embedded = embedded_worker()
    worker = embedded.worker if embedded is not None else None
    return {
        "configured": embedded is not None,
        "replica": worker.replica if worker is not None else None,
        "threads": sorted(t.name for t in threading.enumerate() if t.name.startswith("pyfiq")),
    }


class Command(BaseCommand):
    def handle(self, *args: Any, **options: Any) -> None:
        call_command("migrate", verbosity=0)
        after_migrate = state()
        request_started.send(sender=self.__class__, environ={})
        after_request = state()
        embedded = embedded_worker()
        stopped = embedded.stop(5) if embedded is not None else None
        out = {
            "after_migrate": after_migrate,
            "after_request": after_request,
            "stopped": stopped,
            "deferrer": type(default_registry.deferrer).__name__,
            "backend": repr(pyfiq.get_backend()),
        }
        self.stdout.write(json.dumps(out))

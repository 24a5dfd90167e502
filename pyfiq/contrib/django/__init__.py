"""pyfiq in a Django project: add ``"pyfiq.contrib.django"`` to ``INSTALLED_APPS`` and, if the
defaults do not suit, a ``PYFIQ`` dict to the settings (``pyfiq.contrib.django.conf`` lists its
keys). When Django starts, the application configures the backend of ``@pyfiq.fifo`` functions
from it, imports each installed app's ``tasks`` module, and holds every enqueue made inside
``transaction.atomic()`` until the transaction commits (``pyfiq.contrib.django.transaction``).

Workers run either in a process of their own, ``python manage.py pyfiq_worker`` (the options of
``pyfiq worker``), or embedded in the serving processes (``PYFIQ["EMBEDDED_WORKER"] = True``):
started in a process when it serves its first request, or by ``start_worker()`` (a pre-fork
server's post-fork hook), never in ``migrate`` or another management command.
"""

from __future__ import annotations

from .setup import configure, current_settings, embedded_worker, start_worker

__all__ = ["configure", "current_settings", "embedded_worker", "start_worker"]

"""The Django application ``pyfiq.contrib.django`` (label ``pyfiq``)."""

from __future__ import annotations

from django.apps import AppConfig
from django.conf import settings

from .setup import configure


class PyfiqConfig(AppConfig):  # type: ignore[misc]  # Django ships no type information
    """Configures pyfiq from ``settings.PYFIQ`` once Django's apps are loaded."""

    name = "pyfiq.contrib.django"
    label = "pyfiq"
    verbose_name = "pyfiq"
    default = True

    def ready(self) -> None:
        configure(getattr(settings, "PYFIQ", None))

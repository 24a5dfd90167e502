"""Moved to ``tests.support.smoke``; the names stay importable from here."""

from tests.support.smoke import run_smoke, smoke_settings

__all__ = ["run_smoke", "smoke_settings"]

"""Moved to ``tests.support.keyed_app``; replicas still ``--import tests.keyed_app``."""

from tests.support.keyed_app import KEYED_QUEUE, keyed_step

__all__ = ["KEYED_QUEUE", "keyed_step"]

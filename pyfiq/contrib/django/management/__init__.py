"""The management commands of ``pyfiq.contrib.django``."""

"""The operator surface: the ``pyfiq`` command (worker, dead letters, status) and the demo."""

"""``python -m pyfiq_harness run|producer|check|health``: the scenario runner's command line."""

from pyfiq_harness.cli import cli

cli()

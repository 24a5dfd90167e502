"""Helpers of the test suite alone (the process helpers it shares with the benchmarks and the
scenario runner live in the harness distribution, ``pyfiq_harness``)."""

"""The fault-injection harness (scenario runner, loopback fault proxy, journaled scenario
tasks, clock-shift shim), which users can run against their own Redis. Never imported by the
runtime; it registers no tasks unless run.
"""

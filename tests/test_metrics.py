"""pyfiq.metrics: exact counts after a run, labels by queue, enable/disable, and pyfiq without
prometheus-client."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from pyfiq import ConfigurationError, ThreadedWorker, configure, current_task, fifo, hooks, metrics
from tests.support.helpers import drained, wait_until
from tests.workers.test_worker import qname


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    reg = CollectorRegistry()
    metrics.enable(reg)
    yield reg
    metrics.disable(reg)


def test_a_run_is_counted_exactly_by_queue(backend, registry) -> None:  # type: ignore[no-untyped-def]
    q = qname()
    configure(backend)

    @fifo(queue=q, name=f"{q}.work", key=lambda i: f"k{i % 2}", max_retries=2, retry_wait=0.01)
    def work(i: int) -> None:
        if i == 1 and current_task().attempt == 1:
            raise OSError("flaky")
        if i == 2:
            raise ValueError("bad input")

    for i in range(5):
        work(i)
    work.send_with_options(args=(9,), dedup_key="seen")
    work.send_with_options(args=(9,), dedup_key="seen")  # a duplicate stores nothing
    with ThreadedWorker(backend, queues=[q]):
        wait_until(lambda: drained(backend, f"{q}#k0", f"{q}#k1"))
        wait_until(lambda: registry.get_sample_value("pyfiq_leases_total", {"queue": q, "event": "released"}) == 2)

    def tasks(outcome: str) -> float | None:
        return registry.get_sample_value("pyfiq_tasks_total", {"queue": q, "outcome": outcome})

    # 0, 3, 4, 9 at once, 1 at its second attempt, 2 three times and dead-lettered.
    assert (tasks("succeeded"), tasks("failed"), tasks("retried"), tasks("dead_lettered")) == (5, 4, 3, 1)
    assert tasks("fenced") is None
    assert registry.get_sample_value("pyfiq_task_duration_seconds_count", {"queue": q}) == 9
    assert registry.get_sample_value("pyfiq_enqueued_total", {"queue": q}) == 6
    assert registry.get_sample_value("pyfiq_leases_total", {"queue": q, "event": "acquired"}) == 2
    labels = {tuple(s.labels.items()) for m in registry.collect() for s in m.samples}
    assert not any("#" in value for pairs in labels for _, value in pairs), "labelled by stream"


def test_enable_is_idempotent_per_registry_and_disable_stops_counting() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    listener = metrics.enable(first)
    try:
        assert metrics.enable(first) is listener
        metrics.enable(second)
        hooks.dispatcher.on_enqueue("q-metrics-unit", 2)
        metrics.disable(second)
        hooks.dispatcher.on_enqueue("q-metrics-unit", 3)
        assert first.get_sample_value("pyfiq_enqueued_total", {"queue": "q-metrics-unit"}) == 5
        assert second.get_sample_value("pyfiq_enqueued_total", {"queue": "q-metrics-unit"}) is None
    finally:
        metrics.disable(first)
        metrics.disable(second)
    hooks.dispatcher.on_enqueue("q-metrics-unit", 1)
    assert first.get_sample_value("pyfiq_enqueued_total", {"queue": "q-metrics-unit"}) is None


def test_enable_without_prometheus_client_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # what an import sees when it is missing
    with pytest.raises(ConfigurationError, match=r"pip install 'pyfiq\[metrics\]'"):
        metrics.enable(CollectorRegistry())


def test_pyfiq_and_its_command_work_without_prometheus_client() -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["prometheus_client"] = None
        import pyfiq
        from click.testing import CliRunner
        from pyfiq.ops.cli import main

        helped = CliRunner().invoke(main, ["--help"])
        assert helped.exit_code == 0 and "exporter" in helped.output, helped.output
        served = CliRunner().invoke(main, ["exporter", "--redis", "memory://"])
        assert served.exit_code == 1, served.output
        print(served.output)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pip install 'pyfiq[metrics]'" in result.stdout

"""The work itself in a real headless Chromium, served by uvicorn against the suite's
redis-server: a stream's tasks page reached from its queue, its arguments opened (redacted), a
delete and a move to the dead letters confirmed, and a task found by its id alone, each under
the dashboard's Content-Security-Policy."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pyfiq import RedisQueueBackend
from pyfiq.dashboard import create_app
from tests.dashboard.scene import enqueue, serve
from tests.support.helpers import unique_prefix

SECRET = "hunter2-Sup3r"


@pytest.fixture
def backend(redis_server: Any) -> Iterator[RedisQueueBackend]:
    b = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), shards=4, lease_ttl=3.0)
    yield b
    b.close()


@pytest.fixture
def watched(page: Any) -> Any:
    """The page, recording every Content-Security-Policy violation in ``window.violations``."""
    page.add_init_script(
        "window.violations = [];"
        "document.addEventListener('securitypolicyviolation', e => window.violations.push(e.violatedDirective));"
    )
    return page


def pending(b: RedisQueueBackend, stream: str) -> list[str]:
    return [raw[:32].decode() for raw in b.client.lrange(b.keys.stream(stream).pending, 0, -1)]


def test_a_streams_tasks_open_redacted_and_one_is_deleted_another_moved(
    backend: RedisQueueBackend, watched: Any
) -> None:
    page = watched
    stream = "orders#acct-7"
    ids = [enqueue(backend, stream, "app.ship", {"order": n, "api_key": SECRET, "note": "x" * 300}) for n in range(4)]
    backend.call(backend.ops.acquire(stream, 1, holder="web-3"))  # the first is running on web-3
    with serve(create_app(backend, refresh=0)) as url:
        page.goto(url + "/queue/orders")
        page.locator('#streams tr[data-stream="orders#acct-7"] [data-col="pending"] a').click()
        rows = page.locator("#tasks tbody tr")
        assert rows.evaluate_all("rows => rows.map(r => r.dataset.task)") == ids
        assert rows.evaluate_all("rows => rows.map(r => r.dataset.state)") == ["running"] + ["pending"] * 3
        assert "web-3" in rows.first.inner_text() and rows.first.locator("button").count() == 0
        args = rows.nth(1).locator("details")
        assert not args.locator("pre").is_visible()
        args.locator("summary").click()
        shown = args.locator("pre").inner_text()
        assert "'api_key': <redacted>" in shown and "'order': 1" in shown and SECRET not in page.content()
        rows.nth(2).get_by_role("button", name="Delete…").click()
        assert f"Delete task {ids[2]} (app.ship) of {stream}" in page.locator("#what").inner_text()
        assert pending(backend, stream) == ids[1:], "nothing happens before the confirmation"
        page.get_by_role("button", name="Delete").click()
        assert f"task {ids[2]} (app.ship) of '{stream}' deleted" in page.locator(".flash").inner_text()
        assert page.locator("#tasks tbody tr").evaluate_all("rows => rows.map(r => r.dataset.task)") == [
            ids[0],
            ids[1],
            ids[3],
        ]
        page.locator(f'#tasks tr[data-task="{ids[3]}"]').get_by_role("button", name="Dead-letter…").click()
        page.get_by_role("button", name="Dead-letter").click()
        assert "moved to the dead letters" in page.locator(".flash").inner_text()
        page.locator('[data-stat="dead"] a').click()
        letter = page.locator(f'#dead tr[data-task="{ids[3]}"]')
        assert (
            "operator" in letter.inner_text() and "moved to the dead letters from the dashboard" in letter.inner_text()
        )
        letter.locator("details summary").first.click()
        assert "'api_key': <redacted>" in letter.locator("[data-args] pre").inner_text()
        assert page.evaluate("window.violations") == []
    assert pending(backend, stream) == [ids[1]]


def test_a_task_found_by_its_id_alone_leads_to_its_place_in_its_stream(
    backend: RedisQueueBackend, watched: Any
) -> None:
    page = watched
    for n in range(3):
        enqueue(backend, "hooks#c-1", "app.deliver", n)
    wanted = enqueue(backend, "hooks#c-2", "app.deliver", {"event": "paid"})
    with serve(create_app(backend, refresh=0)) as url:
        page.goto(url + "/queue/hooks")
        page.fill("#task-id", wanted)
        page.get_by_role("button", name="Find task").click()
        assert page.locator('[data-stat="state"]').inner_text() == "pending"
        assert "hooks#c-2" in page.locator("#task").inner_text()
        page.locator('[data-stat="stream-link"]').click()
        assert page.locator("#tasks tbody tr").first.get_attribute("data-task") == wanted
        page.goto(url + f"/task/hooks?id={'0' * 32}")
        assert "found only with its stream key" in page.locator('[data-stat="searched"]').inner_text()
        assert page.evaluate("window.violations") == []

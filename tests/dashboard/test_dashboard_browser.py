"""The dashboard in a real headless Chromium, served by uvicorn, against a real redis-server
holding tasks in every state (see ``scene.py``): what a person sees and what their clicks do."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.dashboard.scene import Scene, dashboard, enqueue, fail_once, ran, serve, ship, wait_for


def cell(page: Any, queue: str, col: str) -> str:
    return str(page.locator(f'#queues tr[data-queue="{queue}"] [data-col="{col}"]').inner_text()).strip()


def test_the_overview_lists_every_queue_with_its_numbers_trouble_first(scene: Scene, page: Any) -> None:
    with serve(dashboard(scene)) as url:
        page.goto(url + "/")
        rows = page.locator("#queues tbody tr").evaluate_all("rows => rows.map(r => r.dataset.queue)")
        assert sorted(rows) == ["billing", "hooks", "mail", "stuck", "work"]
        assert rows[0] == "stuck", "a blocked queue comes first"
        assert rows.index("work") < rows.index("billing"), "dead letters growing come before a quiet backlog"
        expected = {  # queue: (depth, in flight, dead letters, live streams)
            "billing": ("3", "0", "0", "1"),
            "hooks": ("4", "0", "2", "2"),
            "mail": ("1", "0", "0", "1"),
            "stuck": ("0", "1", "0", "1"),
            "work": ("0", "0", "1", "0"),
        }
        for queue, numbers in expected.items():
            assert tuple(cell(page, queue, c) for c in ("pending", "inflight", "dead", "streams")) == numbers, queue
        assert "paused" in cell(page, "mail", "state")
        assert "1 blocked" in cell(page, "stuck", "state")
        assert "no consumer" in cell(page, "billing", "state"), "no worker consumes billing"
        # 4 succeeded and 1 failed within the last minute: the rates say so, fleet-wide.
        succeeded, failed = float(cell(page, "work", "succeeded")), float(cell(page, "work", "failed"))
        assert 0 < succeeded <= 4 / 60 + 0.005 and 0 < failed <= 1 / 60 + 0.005
        assert failed < succeeded
        assert page.locator('[data-stat="replicas"]').inner_text().strip() == "1"


def test_a_blocked_stream_is_marked_with_its_running_head_and_holder(scene: Scene, page: Any) -> None:
    with serve(dashboard(scene)) as url:
        page.goto(url + "/queue/stuck")
        row = page.locator('#held tr[data-stream="stuck"]')
        assert row.get_attribute("class") == "blocked"
        assert "blocked" in row.locator(".badge").first.inner_text()
        text = row.inner_text()
        assert "scene.sync_crm" in text and "web-1" in text, text
        assert page.locator('[data-stat="state"]').inner_text().strip() == "1 blocked"
        # Another queue's streams are not blocked.
        page.goto(url + "/queue/billing")
        assert page.locator("tr.blocked").count() == 0
        assert page.locator('#streams tr[data-stream="billing"] [data-col="pending"]').inner_text() == "3"


def test_a_dead_letters_traceback_opens(scene: Scene, page: Any) -> None:
    with serve(dashboard(scene)) as url:
        page.goto(url + "/dead/work")
        row = page.locator("#dead tbody tr").first
        assert "exhausted" in row.inner_text() and "builtins.RuntimeError" in row.inner_text()
        trace = row.locator("details pre")
        assert not trace.is_visible()
        row.locator("summary", has_text="Traceback").click()
        assert trace.is_visible()
        assert "invoice -3 was refused by the payment provider" in trace.inner_text()
        assert 'raise RuntimeError(f"invoice {invoice} was refused' in trace.inner_text()


def test_requeue_to_front_puts_the_task_back_at_the_head_and_it_runs_first(scene: Scene, page: Any) -> None:
    backend = scene.backend
    fail_once.add("o-1")
    worker = scene.worker(["orders"])
    ship("o-1")
    wait_for(lambda: backend.queue_info("orders")["dead"] == 1, what="o-1 to be dead-lettered")
    worker.stop(timeout=10)
    ran.clear()
    later = [enqueue(backend, "orders", "scene.ship", f"o-{i}") for i in (2, 3)]
    with serve(dashboard(scene)) as url:
        page.goto(url + "/dead/orders")
        page.locator("#dead tbody tr").first.get_by_role("button", name="To front…").click()
        assert "Requeue 1 dead letter of orders to the front" in page.locator("#what").inner_text()
        assert backend.queue_info("orders")["dead"] == 1, "nothing happens before the confirmation"
        page.get_by_role("button", name="Requeue").click()
        assert "requeued 1 dead letter to the front" in page.locator(".flash").inner_text()
    pending = backend.client.lrange(backend.keys.stream("orders").pending, 0, -1)
    assert [p[:32].decode() for p in pending][1:] == later
    scene.worker(["orders"])
    wait_for(lambda: len(ran) == 3, what="the three orders to run")
    assert ran == [("orders", "o-1"), ("orders", "o-2"), ("orders", "o-3")]


def test_pause_stops_the_queue_across_the_fleet_until_resumed(scene: Scene, page: Any) -> None:
    scene.worker(["jobs"], replica="fleet-a")
    scene.worker(["jobs"], replica="fleet-b")
    with serve(dashboard(scene)) as url:
        enqueue(scene.backend, "jobs", "scene.job", 0)
        wait_for(lambda: ("jobs", 0) in ran, what="a first job to run")
        page.goto(url + "/queue/jobs")
        page.get_by_role("button", name="Pause queue").click()
        assert "paused jobs" in page.locator(".flash").inner_text()
        assert "paused" in page.locator('[data-stat="state"]').inner_text()
        for n in (1, 2, 3):
            enqueue(scene.backend, "jobs", "scene.job", n)
        time.sleep(1.5)  # both workers poll and are woken meanwhile
        assert [r for r in ran if r[0] == "jobs"] == [("jobs", 0)], "no replica started a paused queue's task"
        assert all(w.healthy for w in scene.workers)
        page.get_by_role("button", name="Resume queue").click()
        wait_for(lambda: len([r for r in ran if r[0] == "jobs"]) == 4, what="the paused jobs to run")
    assert [r for r in ran if r[0] == "jobs"] == [("jobs", n) for n in range(4)]


def test_read_only_shows_no_action(scene: Scene, page: Any) -> None:
    with serve(dashboard(scene, read_only=True)) as url:
        for path in ("/", "/queue/stuck", "/queue/hooks", "/dead/work", "/dead/hooks", "/replicas", "/schedules"):
            page.goto(url + path)
            assert page.locator("table").count() > 0, path
            assert page.locator('form[method="post"]').count() == 0, path
            assert page.locator("input[type=checkbox], [data-action]").count() == 0, path
            buttons = page.locator("button").all_inner_texts()
            assert set(buttons) <= {"Search", "Filter", "Find task"}, (path, buttons)  # GET forms
        assert page.request.post(url + "/act/pause", form={"queue": "billing"}).status in (404, 405)
    assert scene.backend.paused() == ["mail"]


def test_the_figures_refresh_without_a_reload(scene: Scene, page: Any) -> None:
    with serve(dashboard(scene, refresh=0.3)) as url:
        page.goto(url + "/")
        page.evaluate("window.loadedOnce = true")
        page.locator('#queues tr[data-queue="billing"] a').focus()
        for i in range(2):
            enqueue(scene.backend, "billing", "app.charge", f"late-{i}", 1)
        # The queue table holds the focus, so it waits; the fleet figures refresh meanwhile.
        page.wait_for_function("() => document.body.dataset.refreshed !== undefined")
        assert cell(page, "billing", "pending") == "3"
        page.evaluate("document.activeElement.blur()")
        page.wait_for_function(
            """() => document.querySelector('#queues tr[data-queue="billing"] [data-col="pending"]')
                        .textContent.trim() === '5'"""
        )
        assert page.evaluate("window.loadedOnce") is True, "the page was not reloaded"


@contextmanager
def attacker(html: str) -> Iterator[int]:
    """Another web server on loopback that answers every GET with ``html``; yields its port."""

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.mark.parametrize(
    ("dashboard_host", "attacker_host", "cookie_domain"),
    [
        # A sibling subdomain: it may set a cookie for the whole site.
        ("ops.example.test", "evil.example.test", "; domain=example.test"),
        # Another port of the dashboard's own host: cookies do not tell ports apart.
        ("127.0.0.1", "127.0.0.1", ""),
    ],
)
def test_a_form_posted_from_another_origin_of_the_same_site_does_not_act(
    scene: Scene, page: Any, dashboard_host: str, attacker_host: str, cookie_domain: str
) -> None:
    with serve(dashboard(scene)) as url:
        target = url.replace("127.0.0.1", dashboard_host)
        html = f"""<!doctype html><title>Win a prize</title>
<form method="post" action="{target}/act/pause">
<input name="queue" value="billing"><input name="csrf" value="planted-token"></form>
<script>
document.cookie = "pyfiq_csrf=planted-token; path=/{cookie_domain}";
document.forms[0].submit();
</script>"""
        with attacker(html) as port:
            with page.expect_response(lambda r: r.url == f"{target}/act/pause") as answer:
                page.goto(f"http://{attacker_host}:{port}/")
            assert "pyfiq_csrf=planted-token" in (answer.value.request.header_value("cookie") or "")
            assert answer.value.status == 403
            assert "refused" in answer.value.text()
        assert scene.backend.paused() == ["mail"], "the billing queue was not paused"
        # The dashboard's own pages still act.
        page.goto(target + "/queue/billing")
        page.get_by_role("button", name="Pause queue").click()
        assert "paused billing" in page.locator(".flash").inner_text()
    assert sorted(scene.backend.paused()) == ["billing", "mail"]


HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}


def test_the_pages_work_under_their_content_security_policy(scene: Scene, page: Any) -> None:
    refused: list[str] = []
    page.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
    page.add_init_script(
        "window.violations = [];"
        "document.addEventListener('securitypolicyviolation', e => window.violations.push(e.violatedDirective));"
    )
    with serve(dashboard(scene, refresh=0.3)) as url:
        for path in ("/", "/queue/stuck", "/queue/hooks", "/dead/work", "/dead/hooks", "/replicas", "/schedules"):
            response = page.goto(url + path)
            assert response is not None and response.status == 200, path
            for name, value in HEADERS.items():
                assert response.headers.get(name) == value, (path, name)
            # The stylesheet applied: the header bar's background comes from dashboard.css.
            assert page.locator("header.top").evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(36, 41, 47)"
        # The script ran: it refreshes the figures; the traceback opens; a confirmation comes up.
        page.goto(url + "/dead/work")
        page.wait_for_function("() => document.body.dataset.refreshed !== undefined")
        page.locator("#dead tbody tr").first.locator("summary", has_text="Traceback").click()
        assert page.locator("#dead details pre").first.is_visible()
        page.get_by_role("button", name="Purge all…").click()
        assert "Delete all 1 dead letters of work" in page.locator("#what").inner_text()
        assert page.evaluate("window.violations") == [] and refused == []
        # The policy is in force: a style the page did not load from the dashboard is refused.
        page.evaluate("document.head.appendChild(document.createElement('style')).textContent = 'body{color:red}'")
        page.wait_for_function("() => window.violations.length > 0")
        assert page.evaluate("window.violations")[0].startswith("style-src")
    assert scene.backend.queue_info("work")["dead"] == 1, "the purge was only asked for"

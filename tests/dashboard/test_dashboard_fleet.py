"""The fleet as the dashboard shows it: the queues each live replica consumes (and a queue nobody
consumes), the Replicas page, each queue's last hour, the standalone command's authentication,
and every page on a 480 px wide screen. Real redis-server, real workers, real ``pyfiq dashboard``
processes, headless Chromium."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from pyfiq import RedisQueueBackend, Registry, ThreadedWorker, __version__
from pyfiq.dashboard import create_app
from pyfiq.dashboard.auth import BASIC_ENV, BEARER_ENV, is_loopback
from pyfiq.engine.keys import COUNT_MINUTES
from pyfiq.engine.protocol import BEAT_QUEUE_CHARS, BEAT_QUEUES, consumed_fields
from pyfiq.ops.cli import main
from pyfiq_harness.servers import free_port
from tests.dashboard.scene import Scene, dashboard, enqueue, serve, wait_for
from tests.support.helpers import unique_prefix


@pytest.fixture
def backend(redis_server: Any) -> Iterator[RedisQueueBackend]:
    # Heartbeats every 50 ms: an idle worker's record is rewritten every 250 ms and counts as
    # live for three of those, so a stopped worker is gone from the fleet within a second.
    b = RedisQueueBackend(
        redis_server.url, prefix=unique_prefix(), shards=4, lease_ttl=1.0, heartbeat_interval=0.05, poll_interval=0.1
    )
    yield b
    b.close()


def state(client: TestClient, queue: str) -> str:
    """The overview's state cell of ``queue``, as text."""
    page = client.get("/").text
    cell = re.search(rf'<tr data-queue="{re.escape(queue)}".*?data-col="state">(.*?)</td>', page, flags=re.S)
    assert cell is not None, page
    return " ".join(re.sub(r"<[^>]+>", " ", cell.group(1)).split())


def queue_state(client: TestClient, queue: str) -> str:
    """The queue page's state, as text."""
    cell = re.search(r'data-stat="state">(.*?)</dd>', client.get(f"/queue/{queue}").text, flags=re.S)
    assert cell is not None
    return " ".join(re.sub(r"<[^>]+>", " ", cell.group(1)).split())


def names() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:6]
    return f"held-{tag}", f"listed-{tag}"


# -- who consumes what ---------------------------------------------------------------------------


def test_a_queue_shows_running_while_a_live_worker_consumes_it_and_no_consumer_once_it_is_gone(
    backend: RedisQueueBackend,
) -> None:
    held, listed = names()
    registry = Registry(backend)
    gate = threading.Event()
    hold = registry.fifo(queue=held, name=f"{held}.hold")(lambda: gate.wait(10))
    later = registry.fifo(queue=listed, name=f"{listed}.later")(lambda: None)
    backend.pause(listed)
    later()  # stays pending: the queue is paused, so only the worker's list says it consumes it
    hold()
    client = TestClient(create_app(backend))
    # No queue filter: the worker consumes every queue it has a function for.
    with ThreadedWorker(backend, registry=registry, replica="consumer", concurrency=2):
        wait_for(lambda: backend.queue_info(held)["inflight"] == 1, what="the held task to start")
        wait_for(lambda: any(r.get("held") for r in backend.replicas()), what="a heartbeat naming it")
        (record,) = backend.replicas()
        assert record["queues"] == sorted([held, listed]) and record["queues_registered"] is True
        assert "every queue it has a function for" in client.get("/replicas").text
        assert state(client, held) == "running" and queue_state(client, held) == "running"
        assert state(client, listed) == "paused", "listed among its queues: consumed, though paused"
        gate.set()
    wait_for(lambda: not backend.replicas(), timeout=5, what="the stopped worker's record to go stale")
    hold()  # a task again, and nobody to run it
    assert state(client, held) == "no consumer" and queue_state(client, held) == "no consumer"
    assert state(client, listed) == "paused no consumer"
    assert [q.consumed for q in backend.admin.overview(queue=held)] == [False]


def test_a_stopping_worker_no_longer_counts_as_consuming_the_queues_it_will_not_claim(
    backend: RedisQueueBackend,
) -> None:
    """A stop that timed out leaves the worker heartbeating for its running task, however long
    that takes; it claims nothing more, so its other queues show no consumer meanwhile."""
    held, listed = names()
    registry = Registry(backend)
    gate = threading.Event()
    hold = registry.fifo(queue=held, name=f"{held}.hold")(lambda: gate.wait(10))
    later = registry.fifo(queue=listed, name=f"{listed}.later")(lambda: None)
    client = TestClient(create_app(backend))
    worker = ThreadedWorker(backend, registry=registry, queues=[held, listed], concurrency=2).start()
    try:
        hold()
        wait_for(lambda: backend.queue_info(held)["inflight"] == 1, what="the held task to start")
        assert not worker.stop(timeout=0.2), "the stop timed out: the task still runs"
        later()
        wait_for(lambda: state(client, listed) == "no consumer", timeout=3, what="the listed queue's badge")
        assert state(client, held) == "running", "the stream it still holds is still worked on"
        assert backend.queue_info(listed)["pending"] == 1
    finally:
        gate.set()
        worker.stop(5)


def _record(backend: RedisQueueBackend, replica: str, **fields: Any) -> None:
    """A registry record as a live replica writes it, with ``fields`` of the test's choosing."""
    seconds, micros = backend.client.time()
    body = {"host": "h", "pid": 1, "driver": "threaded", "concurrency": 2, "heartbeat_ms": 600_000, "held": []}
    body |= {**fields, "seen_ms": seconds * 1000 + micros // 1000}
    backend.client.hset(backend.keys.replicas, replica, json.dumps(body))


def test_a_record_that_does_not_list_its_queues_shows_neither_no_consumer_nor_running(
    backend: RedisQueueBackend,
) -> None:
    queue, other = names()
    backend.enqueue(queue, [(uuid.uuid4().hex, _task())])
    client = TestClient(create_app(backend))
    assert state(client, queue) == "no consumer", "no live replica at all"
    _record(backend, "old-replica")  # an older pyfiq: no "queues" field, no version
    assert state(client, queue) == "consumer unknown" and queue_state(client, queue) == "consumer unknown"
    page = client.get("/replicas").text
    assert re.search(r'data-col="version">older<', page) and "not said" in page
    # A list cut at the heartbeat's bound says nothing of the queues it does not name.
    backend.client.hdel(backend.keys.replicas, "old-replica")
    _record(backend, "cut", queues=[other], queues_cut=True)
    assert state(client, queue) == "consumer unknown"
    _record(backend, "named", queues=[queue])
    assert state(client, queue) == "running"
    # An old record holding a stream of the queue proves a consumer, list or no list.
    backend.client.hdel(backend.keys.replicas, "cut", "named")
    _record(backend, "old-holder", held=[queue])
    assert state(client, queue) == "running"


def _task() -> Any:
    from pyfiq.task import TaskRecord

    return TaskRecord("app.t", [], {})


def test_records_no_heartbeat_writes_are_left_out_not_the_pages(backend: RedisQueueBackend) -> None:
    """A record is anyone's write to one hash field: forged or broken ones never fail a page."""
    held, _ = names()
    _record(backend, "good", queues=[held])
    for name, body in {
        "a-list": "[]",
        "text-seen": '{"seen_ms": "x"}',
        "deep": "[" * 100_000,
        "held-ints": '{"seen_ms": 0, "held": [1], "heartbeat_ms": 1}',
        "not-json": "{",
    }.items():
        backend.client.hset(backend.keys.replicas, name, body)
    assert [r["replica"] for r in backend.replicas()] == ["good"]
    client = TestClient(create_app(backend))
    for path in ("/", f"/queue/{held}", "/replicas", f"/task/{held}?id={'0' * 32}"):
        assert client.get(path).status_code == 200, path


def test_a_heartbeats_list_of_queues_is_bounded_and_says_when_it_was_cut() -> None:
    few = consumed_fields(["a", "b"], registered=False)
    assert few == {"queues": ["a", "b"]}
    many = consumed_fields([f"q{i:04}" for i in range(BEAT_QUEUES + 50)], registered=True)
    assert len(many["queues"]) == BEAT_QUEUES and many["queues_cut"] is True and many["queues_registered"] is True
    long = consumed_fields([f"{i:03}" + "x" * 197 for i in range(40)], registered=False)
    assert sum(map(len, long["queues"])) <= BEAT_QUEUE_CHARS and long["queues_cut"] is True
    assert len(long["queues"]) == BEAT_QUEUE_CHARS // 200


def test_the_replicas_page_lists_each_ones_queues_version_and_concurrency(backend: RedisQueueBackend) -> None:
    first, second = names()
    with ThreadedWorker(backend, queues=[second, first], concurrency=3, replica="filtered"):
        wait_for(lambda: bool(backend.replicas()), what="a first heartbeat")
        page = TestClient(create_app(backend)).get("/replicas").text
        record = backend.replicas()[0]
    assert record["queues"] == sorted([first, second]) and "queues_registered" not in record
    row = re.search(r'<tr data-replica="filtered">(.*?)</tr>', page, flags=re.S)
    assert row is not None, page
    cells = dict(re.findall(r'data-col="(\w+)">(.*?)</td>', row.group(1), flags=re.S))
    assert cells["version"] == __version__ and cells["concurrency"] == "3"
    assert re.findall(r"<code>(.*?)</code>", cells["queues"]) == sorted([first, second])
    assert f'href="/queue/{first}"' in cells["queues"]


# -- the last hour ------------------------------------------------------------------------------


def test_the_chart_shows_the_hour_counted_by_real_task_runs(backend: RedisQueueBackend) -> None:
    queue = f"settle-{uuid.uuid4().hex[:6]}"
    registry = Registry(backend)

    def settle(n: int) -> None:
        if n < 0:
            raise RuntimeError(f"refused {n}")

    task = registry.fifo(queue=queue, name=f"{queue}.settle", max_retries=0)(settle)
    for n in (1, 2, -3, 4, 5, -6, 7):
        task(n)
    quiet = TestClient(create_app(backend)).get(f"/queue/{queue}").text
    assert f"No task of {queue} ended in the last hour." in quiet and "<svg" not in quiet
    with ThreadedWorker(backend, registry=registry):
        wait_for(lambda: backend.queue_info(queue)["dead"] == 2 and not backend.queue_info(queue)["pending"])
    page = TestClient(create_app(backend)).get(f"/queue/{queue}").text
    section = re.search(r'<section id="history".*?</section>', page, flags=re.S)
    assert section is not None
    rows = re.findall(
        r'<tr><th scope="row">(\d\d:\d\d)</th><td class="num" data-col="succeeded">(\d+)</td>'
        r'<td class="num" data-col="failed">(\d+)</td></tr>',
        section.group(0),
    )
    assert len(rows) == COUNT_MINUTES
    assert (sum(int(r[1]) for r in rows), sum(int(r[2]) for r in rows)) == (5, 2)
    # Minute by minute, what the table says is what the scripts counted in Redis.
    counted: dict[int, tuple[int, int]] = {}
    for shard in range(backend.keys.shards):
        ring = {k.decode(): int(v) for k, v in backend.client.hgetall(backend.keys.counts(shard, queue)).items()}
        for slot in range(COUNT_MINUTES):
            if f"m{slot}" in ring:
                ok, failed = counted.get(ring[f"m{slot}"], (0, 0))
                counted[ring[f"m{slot}"]] = (ok + ring[f"s{slot}"], failed + ring[f"f{slot}"])
    shown = {(m, int(s), int(f)) for m, s, f in rows if (s, f) != ("0", "0")}
    assert shown == {(f"{m // 60 % 24:02}:{m % 60:02}", ok, failed) for m, (ok, failed) in counted.items()}
    # The drawing: an image with a title naming the queue, a bar part per non-empty count.
    svg = re.search(r"<svg [^>]*>.*?</svg>", section.group(0), flags=re.S)
    assert svg is not None and 'role="img"' in svg.group(0)
    assert f"Tasks of {queue} per minute over the last hour" in html.unescape(svg.group(0))
    assert "5 succeeded and 2 failed" in svg.group(0)
    assert svg.group(0).count('class="ok"') == sum(1 for r in rows if r[1] != "0")
    assert svg.group(0).count('class="failed"') == sum(1 for r in rows if r[2] != "0")


def test_the_hour_is_read_in_one_round_trip_of_one_hmget_per_shard(backend: RedisQueueBackend) -> None:
    from benchmarks.dashboard import RoundTrips

    now = backend.admin.redis_now_ms()
    backend.client.config_resetstat()
    with RoundTrips() as trips:
        backend.admin.history("anything", now_ms=now)
    ran = {k: v["calls"] for k, v in backend.client.info("commandstats").items() if "config" not in k}
    assert trips.count == 1 and ran == {"cmdstat_hmget": backend.keys.shards}


# -- authentication of the standalone command ---------------------------------------------------


def _command(redis_url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "pyfiq", "--redis", redis_url, "--prefix", unique_prefix(), "dashboard", *args]
    clean = {k: v for k, v in os.environ.items() if k not in (BASIC_ENV, BEARER_ENV)}
    return subprocess.Popen(argv, env={**clean, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_the_command_refuses_a_network_address_without_auth(redis_server: Any) -> None:
    proc = _command(redis_server.url, "--host", "0.0.0.0", "--port", str(free_port()))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, (out, err)
    assert b"refusing to listen on 0.0.0.0 without --auth" in err and b"--auth basic" in err


LOOPBACK = ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"]
NETWORK = ["0.0.0.0", "::", "10.1.2.3", "dashboard.example", ""]


@pytest.mark.parametrize("host", LOOPBACK + NETWORK)
def test_only_loopback_addresses_go_without_auth(host: str) -> None:
    assert is_loopback(host) is (host in LOOPBACK)


def test_auth_reads_its_secret_from_the_environment_and_says_which_variable(redis_server: Any) -> None:
    base = ["--redis", redis_server.url, "dashboard", "--host", "0.0.0.0"]
    for kind, env, variable in (
        ("basic", {BASIC_ENV: "ops:short"}, BASIC_ENV),
        ("basic", {BASIC_ENV: "no-colon-here-at-all"}, BASIC_ENV),
        ("token", {BEARER_ENV: ""}, BEARER_ENV),
    ):
        result = CliRunner().invoke(main, [*base, "--auth", kind], env=env)
        assert result.exit_code == 2 and f"${variable}" in result.output, result.output
        secret = env[variable].partition(":")[2] or env[variable]
        assert not secret or secret not in result.output, "the secret is never echoed"


def _until_up(port: int) -> None:
    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code in (200, 401)
        except httpx.TransportError:
            return False

    wait_for(up, timeout=30, what="pyfiq dashboard to answer")


def test_basic_and_token_auth_guard_every_route_of_the_command(redis_server: Any) -> None:
    password, token = "correct horse battery", uuid.uuid4().hex
    basic_port, token_port = free_port(), free_port()
    basic = _command(redis_server.url, "--host", "0.0.0.0", "--port", str(basic_port), "--auth", "basic",
                     env={BASIC_ENV: f"ops:{password}"})  # fmt: skip
    bearer = _command(redis_server.url, "--port", str(token_port), "--auth", "token", env={BEARER_ENV: token})
    try:
        _until_up(basic_port)
        _until_up(token_port)
        url = f"http://127.0.0.1:{basic_port}"
        for path in ("/", "/replicas", "/queue/q", "/assets/dashboard.css"):
            refused = httpx.get(url + path)
            assert refused.status_code == 401, path
            assert refused.headers["www-authenticate"].startswith('Basic realm="pyfiq dashboard"')
            assert httpx.get(url + path, auth=("ops", password + "x")).status_code == 401
            assert httpx.get(url + path, auth=("root", password)).status_code == 401
            assert httpx.get(url + path, auth=("ops", password)).status_code == 200, path
        assert httpx.post(url + "/act/pause", data={"queue": "q"}).status_code == 401
        url = f"http://127.0.0.1:{token_port}"
        for path in ("/", "/schedules", "/assets/dashboard.js"):
            refused = httpx.get(url + path)
            assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer"), path
            assert httpx.get(url + path, headers={"Authorization": f"Bearer {token[:-1]}"}).status_code == 401
            assert httpx.get(url + path, auth=("ops", token)).status_code == 401
            assert httpx.get(url + path, headers={"Authorization": f"Bearer {token}"}).status_code == 200, path
    finally:
        for proc in (basic, bearer):
            proc.terminate()
    for proc, secret in ((basic, password), (bearer, token)):
        out, err = proc.communicate(timeout=10)
        assert b"--auth" in err, err  # it said what it serves...
        assert secret.encode() not in out + err  # ...and never the secret


# -- narrow screens -----------------------------------------------------------------------------

#: Elements sticking out past the right edge of the window, other than inside something that
#: scrolls or clips sideways (a table in its scroller may be wider than the screen).
OVERFLOWING = """() => {
  const width = window.innerWidth;
  const clipped = e => {
    for (let p = e.parentElement; p && p !== document.body; p = p.parentElement) {
      if (['auto', 'scroll', 'hidden'].includes(getComputedStyle(p).overflowX)) return true;
    }
    return false;
  };
  return [...document.body.querySelectorAll('*')]
    .filter(e => e.getClientRects().length && e.getBoundingClientRect().right > width + 0.5 && !clipped(e))
    .map(e => e.tagName + (e.id ? '#' + e.id : '') + (e.className ? '.' + e.className : ''));
}"""


@pytest.fixture
def narrow(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 480, "height": 800})
    context.set_default_timeout(10_000)
    yield context.new_page()
    context.close()


def test_every_page_fits_a_480_px_screen(scene: Scene, narrow: Any) -> None:
    task_id = scene.backend.dead_letters("work")[0].task_id
    # Names as long as pyfiq takes them, with nowhere to break a line.
    long_queue, long_key = "q" * 200, "k" * 180
    enqueue(scene.backend, long_queue, "app.t", 1)
    keyed = enqueue(scene.backend, f"hooks#{long_key}", "app.t", 2)
    pages = ["/", "/queue/stuck", "/queue/hooks", "/queue/work", "/dead/work", "/dead/hooks", "/replicas"]
    pages += ["/schedules", f"/task/work?id={task_id}", f"/queue/{long_queue}", f"/queue/hooks?q={long_key}"]
    pages += [f"/task/hooks?id={keyed}&key={long_key}", f"/stream/{long_queue}"]
    pages += [f"/stream/hooks?stream={quote(f'hooks#{long_key}', safe='')}"]
    with serve(dashboard(scene, refresh=0)) as url:
        for path in pages:
            response = narrow.goto(url + path)
            assert response is not None and response.status == 200, path
            if path == "/queue/work":
                narrow.locator("#history summary").click()  # the numbers' table too
            assert narrow.evaluate("document.documentElement.scrollWidth") <= 480, path
            assert narrow.evaluate(OVERFLOWING) == [], path
            # The navigation wrapped rather than ran off: every link of it is on screen.
            for link in narrow.locator("header nav a").all():
                box = link.bounding_box()
                assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 480, path
        # A confirmation page too.
        narrow.goto(url + "/dead/work")
        narrow.get_by_role("button", name="Purge all…").click()
        narrow.wait_for_selector("#what")
        assert narrow.evaluate("document.documentElement.scrollWidth") <= 480
        assert narrow.evaluate(OVERFLOWING) == []
        # And a removal's, from a stream's tasks page.
        narrow.goto(url + f"/stream/{long_queue}")
        narrow.locator("#tasks tr[data-task]").first.get_by_role("button", name="Delete…").click()
        narrow.wait_for_selector("#what")
        assert narrow.evaluate("document.documentElement.scrollWidth") <= 480
        assert narrow.evaluate(OVERFLOWING) == []
        # The check sees what sticks out.
        narrow.evaluate(
            "document.querySelector('main').appendChild(document.createElement('div')).style.width = '700px'"
        )
        assert narrow.evaluate(OVERFLOWING) == ["DIV"]


def test_the_chart_draws_under_the_content_security_policy(scene: Scene, narrow: Any) -> None:
    narrow.add_init_script(
        "window.violations = [];"
        "document.addEventListener('securitypolicyviolation', e => window.violations.push(e.violatedDirective));"
    )
    with serve(dashboard(scene, refresh=0)) as url:
        narrow.goto(url + "/queue/work")
        chart = narrow.get_by_role("img", name="Tasks of work per minute over the last hour")
        assert chart.is_visible()
        bar = narrow.locator("#history rect.ok").last
        assert bar.evaluate("e => getComputedStyle(e).fill") == "rgb(45, 164, 78)", "dashboard.css colours it"
        assert 0 < (chart.bounding_box() or {}).get("width", 0) <= 480
        assert narrow.evaluate("window.violations") == []

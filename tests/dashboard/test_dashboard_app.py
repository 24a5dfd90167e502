"""The dashboard over HTTP without a browser: CSRF and confirmation of actions, selections kept
in order, paging and search of streams and dead letters, the docs' FastAPI example, the
``pyfiq dashboard`` command, and what a refresh reads from Redis."""

from __future__ import annotations

import html
import importlib.util
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from pyfiq import RedisQueueBackend
from pyfiq.dashboard import create_app
from pyfiq.dashboard.app import CSRF_COOKIE
from pyfiq_harness.servers import free_port
from tests.dashboard.scene import enqueue, wait_for
from tests.support.helpers import unique_prefix
from tests.support.servers import RedisServer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def backend(redis_server: Any) -> Iterator[RedisQueueBackend]:
    b = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), shards=4, lease_ttl=1.5)
    yield b
    b.close()


def dead_letters(b: RedisQueueBackend, stream: str, n: int) -> list[str]:
    """``n`` tasks of ``stream`` dead-lettered as expired (a claim finds them past their deadline)."""
    ids = [enqueue(b, stream, "app.t", i, expires_in=0.001) for i in range(n)]
    time.sleep(0.01)
    b.call(b.ops.acquire(stream, n))
    return ids


def token(client: TestClient) -> str:
    client.get("/")
    return str(client.cookies[CSRF_COOKIE])


def test_an_action_needs_the_forms_token_and_a_same_site_request(backend: RedisQueueBackend) -> None:
    client = TestClient(create_app(backend))
    page = client.get("/")
    assert "samesite=strict" in page.headers["set-cookie"].lower() and "httponly" in page.headers["set-cookie"].lower()
    good = token(client)
    assert client.post("/act/pause", data={"queue": "q"}).status_code == 403
    assert client.post("/act/pause", data={"queue": "q", "csrf": "x" * 43}).status_code == 403
    cross = client.post("/act/pause", data={"queue": "q", "csrf": good}, headers={"Sec-Fetch-Site": "cross-site"})
    assert cross.status_code == 403
    assert backend.paused() == []
    done = client.post("/act/pause", data={"queue": "q", "csrf": good}, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == "/queue/q"
    assert backend.paused() == ["q"]
    # Another browser (no cookie) cannot use a token it read elsewhere.
    other = TestClient(create_app(backend))
    assert other.post("/act/resume", data={"queue": "q", "csrf": good}).status_code == 403
    assert backend.paused() == ["q"]


def test_purge_asks_first_saying_what_it_will_delete(backend: RedisQueueBackend) -> None:
    for key in ("a", "b"):
        dead_letters(backend, f"hooks#{key}", 2)
    client = TestClient(create_app(backend))
    ask = client.post("/act/purge", data={"queue": "hooks", "csrf": token(client)})
    assert ask.status_code == 200
    assert "Delete all 4 dead letters of hooks (2 streams). This cannot be undone." in ask.text
    assert backend.queue_info("hooks#a")["dead"] == 2, "nothing is deleted before the confirmation"
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', ask.text))
    assert fields["confirmed"] == "1"
    done = client.post("/act/purge", data=fields)
    assert done.status_code == 200 and "deleted 4 dead letters" in done.text
    assert [backend.queue_info(f"hooks#{k}")["dead"] for k in "ab"] == [0, 0]


def test_a_selection_requeued_to_the_front_keeps_its_order(backend: RedisQueueBackend) -> None:
    ids = dead_letters(backend, "sel", 3)
    waiting = enqueue(backend, "sel", "app.t", "waiting")
    client = TestClient(create_app(backend))
    picked = [f"{ids[0]}:sel", f"{ids[2]}:sel"]
    form = {"queue": "sel", "op": "selected-front", "csrf": token(client), "confirmed": "1", "task": picked}
    assert "requeued 2 dead letters to the front" in client.post("/act/requeue", data=form).text
    pending = [p[:32].decode() for p in backend.client.lrange(backend.keys.stream("sel").pending, 0, -1)]
    assert pending == [ids[0], ids[2], waiting]
    assert [d.task_id for d in backend.dead_letters("sel")] == [ids[1]]


def test_skip_dead_letters_the_head_as_operator_after_confirming(backend: RedisQueueBackend) -> None:
    head = enqueue(backend, "skipq", "app.t", 1)
    nxt = enqueue(backend, "skipq", "app.t", 2)
    client = TestClient(create_app(backend))
    ask = client.post("/act/skip", data={"queue": "skipq", "stream": "skipq", "csrf": token(client)})
    assert f"Dead-letter the head task {head} (app.t) of skipq as 'operator'" in html.unescape(ask.text)
    assert backend.queue_info("skipq")["pending"] == 2
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', ask.text))
    assert f"dead-lettered {head} as operator" in client.post("/act/skip", data=fields).text
    (letter,) = backend.dead_letters("skipq")
    assert (letter.task_id, letter.reason) == (head, "operator")
    assert backend.client.lindex(backend.keys.stream("skipq").pending, 0)[:32].decode() == nxt  # type: ignore[index]


def test_a_bad_form_is_refused_and_changes_nothing(backend: RedisQueueBackend) -> None:
    client = TestClient(create_app(backend))
    csrf = token(client)
    assert client.post("/act/pause", data={"queue": "bad name!", "csrf": csrf}).status_code == 400
    assert client.post("/act/pause", data={"queue": "q", "stream": "other#k", "csrf": csrf}).status_code == 400
    assert client.post("/act/explode", data={"queue": "q", "csrf": csrf}).status_code == 400
    assert client.post("/act/requeue", data={"queue": "q", "op": "selected-front", "csrf": csrf}).status_code == 400
    assert backend.paused() == []


def test_streams_page_through_every_stream_once_and_search_by_key(backend: RedisQueueBackend) -> None:
    streams = {f"wide#k-{i}" for i in range(300)}
    backend.transport.lay_out(*range(backend.keys.shards))  # raw enqueue calls write no layout
    backend.call_many([backend.ops.enqueue(s, [(uuid.uuid4().hex, 0, "0", b"x")]) for s in sorted(streams)])
    seen: list[str] = []
    cursor: str | None = "0:0"
    while cursor is not None:
        page = backend.admin.stream_page("wide", cursor=cursor, size=50)
        seen += [r.stream for r in page.rows]
        cursor = page.next_cursor
    assert sorted(seen) == sorted(streams)
    found = backend.admin.stream_page("wide", search="k-12")
    assert {r.stream for r in found.rows} == {s for s in streams if "k-12" in s}
    assert found.rows[0].stream == "wide#k-12", "the exact key first"
    client = TestClient(create_app(backend))
    text = client.get("/queue/wide", params={"q": "k-299"}).text
    assert 'data-stream="wide#k-299"' in text and 'data-stream="wide#k-298"' not in text
    # Unclaimed streams show as waiting longest; the overview reads 200 of 300 and says so.
    waiting = re.search(r'<table id="waiting">(.*?)</table>', client.get("/queue/wide").text, flags=re.S)
    assert waiting is not None and waiting.group(1).count("data-stream=") == 10
    row = re.search(r'<tr data-queue="wide".*?</tr>', client.get("/").text, flags=re.S)
    assert row is not None and "300 <small>(200 read)" in row.group(0) and "≥ </span>200" in row.group(0)


def test_dead_letters_filter_by_reason_and_stream_and_page_on(backend: RedisQueueBackend) -> None:
    expired = dead_letters(backend, "mixed", 3)
    enqueue(backend, "mixed", "app.t", "head")
    skipped = backend.skip("mixed")
    dead_letters(backend, "mixed#other", 1)
    client = TestClient(create_app(backend))
    text = client.get("/dead/mixed", params={"stream": "mixed", "reason": "operator"}).text
    assert f'data-task="{skipped}"' in text and not any(f'data-task="{t}"' in text for t in expired)
    page = backend.admin.dead_letter_page(["mixed"], size=2)
    assert [d.task_id for d in page.letters] == expired[:2] and page.next_offset == 2
    rest = backend.admin.dead_letter_page(["mixed"], offset=2, size=2)
    assert [d.task_id for d in rest.letters] == [expired[2], skipped] and rest.next_offset is None
    assert client.get("/dead/mixed", params={"stream": "billing#x"}).status_code == 400


def test_the_docs_fastapi_example_guards_the_dashboard(redis_server: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """docs/operations/dashboard.md, "Inside your app": every page and action of the mount is guarded."""
    page = (ROOT / "docs" / "operations" / "dashboard.md").read_text()
    block = re.search(r"## Inside your app\n.*?```python\n(.*?)```", page, flags=re.S)
    assert block is not None
    # The block ends by trying itself with a test client; the app is what is tested here.
    source = block.group(1).split("# Try it without a server:")[0]
    source = source.replace('"redis://localhost"', repr(redis_server.url))
    assert "create_app(backend, guard=require_operator)" in source
    path = tmp_path / "docs_dashboard.py"
    path.write_text(source)
    monkeypatch.setenv("OPS_PASSWORD", "s3cret")
    spec = importlib.util.spec_from_file_location("docs_dashboard", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    enqueue(module.backend, "readme-q", "app.t", 1)
    with TestClient(module.app) as client:
        assert client.get("/pyfiq/").status_code == 401
        assert client.get("/pyfiq/", auth=("ops", "wrong")).status_code == 401
        assert client.get("/ops/ping", auth=("ops", "wrong")).status_code == 401
        page = client.get("/pyfiq/", auth=("ops", "s3cret"))
        assert page.status_code == 200 and 'data-queue="readme-q"' in page.text
        assert 'href="/pyfiq/queue/readme-q"' in page.text, "links stay under the mount point"
        assert client.post("/pyfiq/act/pause", data={"queue": "readme-q"}).status_code == 401
        csrf = client.cookies[CSRF_COOKIE]
        done = client.post("/pyfiq/act/pause", data={"queue": "readme-q", "csrf": csrf}, auth=("ops", "s3cret"))
        assert done.status_code == 200 and module.backend.paused() == ["readme-q"]
    module.backend.close()


def test_the_dashboard_command_serves_on_localhost(redis_server: Any) -> None:
    b = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), shards=8)
    enqueue(b, "cli-q", "app.t", 1)
    port = free_port()
    argv = [sys.executable, "-m", "pyfiq", "--redis", redis_server.url, "--prefix", b.keys.prefix]
    proc = subprocess.Popen([*argv, "dashboard", "--port", str(port), "--read-only"], stderr=subprocess.PIPE)
    try:

        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=20, what="pyfiq dashboard to answer")
        text = httpx.get(f"http://127.0.0.1:{port}/").text
        assert 'data-queue="cli-q"' in text and "read-only" in text and 'method="post"' not in text
    finally:
        proc.terminate()
        proc.wait(10)
    b.close()


READS = {"llen", "zcard", "get", "pttl", "smismember", "lindex", "hmget", "time", "zrange", "sscan", "zscan"}
READS |= {"hgetall", "zscore", "scard"}


def test_pages_only_read_and_never_use_keys(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        b = RedisQueueBackend(server.url, prefix="p", shards=4)
        dead_letters(b, "hooks#a", 2)
        enqueue(b, "billing", "app.t", 1)
        client = TestClient(create_app(b))
        client.get("/")
        b.client.config_resetstat()
        for path in (
            "/",
            "/queue/hooks",
            "/queue/billing?q=x",
            "/dead/hooks",
            "/dead/hooks?reason=expired",
            "/replicas",
        ):
            assert client.get(path).status_code == 200, path
        ran = {k.removeprefix("cmdstat_") for k in b.client.info("commandstats")}
        ran = {c for c in ran if not c.startswith(("info", "config"))}  # the test's own
        assert ran and ran <= READS, ran - READS
        b.close()
    finally:
        server.stop()


def test_an_overview_reads_the_same_with_1000_and_20000_streams(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    script = ROOT / "scripts" / "bench_dashboard.py"
    done = subprocess.run(
        [sys.executable, str(script), "--streams", "1000,20000", "--json", str(out)], capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    small, large = json.loads(out.read_text())
    assert (small["streams"], large["streams"]) == (1000, 20000)
    for view in ("overview", "search"):
        assert large[view]["commands"] == small[view]["commands"], view
        assert large[view]["round_trips"] == small[view]["round_trips"], view
    assert large["stream_page"]["round_trips"] == 2 and large["stream_page"]["commands"] <= 8 * 60


def test_redis_being_down_shows_a_page_saying_so() -> None:
    b = RedisQueueBackend(f"redis://127.0.0.1:{free_port()}/0", prefix="down")
    response = TestClient(create_app(b)).get("/")
    assert response.status_code == 503 and "Redis could not be read" in response.text
    b.close()


def test_the_replicas_page_shows_each_workers_rate(backend: RedisQueueBackend) -> None:
    from pyfiq import ThreadedWorker, fifo

    q = f"rate-{uuid.uuid4().hex[:6]}"
    work = fifo(queue=q, name=f"{q}.work")(lambda i: None)
    work.enqueue_many([(i,) for i in range(30)], backend=backend)
    with ThreadedWorker(backend, queues=[q], replica="rated") as worker:

        def rate() -> float:
            mine = [r for r in backend.replicas() if r["replica"] == worker.replica]
            return float(mine[0].get("tasks_per_s", 0)) if mine and mine[0].get("done") == 30 else 0.0

        wait_for(lambda: rate() > 0, 10, "a heartbeat counting the 30 tasks")
        page = TestClient(create_app(backend)).get("/replicas").text
    row = re.search(r'<tr data-replica="rated">(.*?)</tr>', page, flags=re.S)
    assert row is not None, page
    shown = re.search(r"<td class=\"num\" data-rate>([0-9.]+)</td>", row.group(1))
    assert shown is not None and float(shown.group(1)) > 0


def test_a_task_is_found_by_its_id_with_its_state_and_result(backend: RedisQueueBackend) -> None:
    from pyfiq import ThreadedWorker, fifo

    q = f"find-{uuid.uuid4().hex[:6]}"

    @fifo(queue=q, name=f"{q}.t", store_result=True, max_retries=0, key=lambda kind: kind)
    def t(kind: str) -> dict[str, str]:
        if kind == "bad":
            raise ValueError("<script>no</script>")
        return {"kind": kind}

    waiting = t.send_with_options(args=("later",), backend=backend)
    client = TestClient(create_app(backend))
    page = client.get(f"/task/{q}", params={"id": waiting.id, "key": "later"})
    assert page.status_code == 200 and 'data-stat="state">pending<' in page.text
    assert "Find task" in client.get(f"/queue/{q}").text
    good, bad = (t.send_with_options(args=(kind,), backend=backend) for kind in ("good", "bad"))
    worker = ThreadedWorker(backend, queues=[q]).start()
    try:
        assert good.result(timeout=20) == {"kind": "good"}
        with pytest.raises(Exception, match="no"):
            bad.result(timeout=20)
    finally:
        worker.stop(5)
    done = client.get(f"/task/{q}", params={"id": good.id, "key": "good"}).text
    assert 'data-stat="state">succeeded<' in done and repr({"kind": "good"}) in html.unescape(done)
    failed = client.get(f"/task/{q}", params={"id": bad.id, "key": "bad"}).text
    assert 'data-stat="reason">exhausted<' in failed and "&lt;script&gt;no&lt;/script&gt;" in failed
    assert "<script>no" not in failed
    assert client.get(f"/task/{q}", params={"id": "nope"}).status_code == 400
    assert client.get(f"/task/{q}", params={"id": good.id, "key": "k\x00"}).status_code == 400
    unknown = client.get(f"/task/{q}", params={"id": "0" * 32}).text
    assert 'data-stat="state">unknown<' in unknown


def test_the_schedules_page_shows_each_schedule_with_its_last_task(backend: RedisQueueBackend) -> None:
    from pyfiq import ThreadedWorker
    from pyfiq.functions import Registry

    q = f"sched-{uuid.uuid4().hex[:6]}"
    registry = Registry(backend)
    registry.periodic(q, every=0.2, name=f"{q}.beat")(lambda: None)
    with ThreadedWorker(backend, registry=registry, queues=[q]):
        wait_for(lambda: any(v.fired >= 2 for v in backend.admin.schedules()))
    backend.admin.pause(q)
    page = TestClient(create_app(backend)).get("/schedules")
    assert page.status_code == 200
    row = re.search(rf'<tr data-schedule="{re.escape(q)}\.beat">(.*?)</tr>', page.text, flags=re.S)
    assert row is not None, page.text
    (view,) = backend.admin.schedules()
    assert "every 200 ms" in row.group(1) and "paused" in row.group(1)
    assert view.task_id is not None and f"?id={view.task_id}" in row.group(1)
    assert re.search(r"data-task-state>(succeeded|unknown|pending)<", row.group(1))
    assert 'href="/schedules"' in page.text, "the page is in the navigation"

"""The dashboard's defences over HTTP, without a browser: actions only from its own origin with a
token it signed, bounded dead-letter pages that never hold up the host app's event loop, a 400
for every bad query parameter, the security headers, and dead letters found in every shard."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from pyfiq import RedisQueueBackend
from pyfiq.backend import pages
from pyfiq.dashboard import create_app
from pyfiq.dashboard.app import Dashboard
from tests.dashboard.scene import enqueue, serve
from tests.support.helpers import unique_prefix

SIBLING = "https://evil.example.com"


@pytest.fixture
def backend(redis_server: Any) -> Iterator[RedisQueueBackend]:
    b = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), shards=4, lease_ttl=1.5)
    yield b
    b.close()


@pytest.fixture
def wide(redis_server: Any) -> Iterator[RedisQueueBackend]:
    """A backend with the default 16 shards."""
    b = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), lease_ttl=1.5)
    assert b.keys.shards == 16
    yield b
    b.close()


def dead_letters(b: RedisQueueBackend, stream: str, n: int) -> list[str]:
    """``n`` tasks of ``stream`` dead-lettered as expired (a claim finds them past their deadline)."""
    ids = [enqueue(b, stream, "app.t", i, expires_in=0.001) for i in range(n)]
    time.sleep(0.01)
    b.call(b.ops.acquire(stream, n))
    return ids


def csrf_cookie(client: TestClient) -> tuple[str, str]:
    """(name, value) of the CSRF cookie the dashboard set in ``client``."""
    (found,) = [(c.name, str(c.value)) for c in client.cookies.jar if "csrf" in c.name]
    return found


def page_token(text: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', text)
    assert found is not None, "the page carries no form token"
    return found.group(1)


# -- actions only from the dashboard's own origin, with a token it signed --------------------------


def test_a_forged_cookie_and_token_pair_is_refused(backend: RedisQueueBackend) -> None:
    client = TestClient(create_app(backend))
    for forged in ("x" * 43, "forged", "bm9uY2U.c2lnbmF0dXJl"):
        client.cookies.set("pyfiq_csrf", forged)
        done = client.post("/act/pause", data={"queue": "q", "csrf": forged})
        assert done.status_code == 403, forged
        done = client.post(
            "/act/pause",
            data={"queue": "q", "csrf": forged},
            headers={"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"},
        )
        assert done.status_code == 403, forged
    assert backend.paused() == []


def test_a_token_signed_by_another_dashboard_is_refused_unless_they_share_the_secret(
    backend: RedisQueueBackend,
) -> None:
    elsewhere = TestClient(create_app(backend))
    assert elsewhere.get("/").status_code == 200
    name, value = csrf_cookie(elsewhere)
    here = TestClient(create_app(backend))
    here.cookies.set(name, value)
    assert here.post("/act/pause", data={"queue": "q", "csrf": value}).status_code == 403
    assert backend.paused() == []
    # Replicas behind one load balancer: a page one served is accepted by the other.
    secret = "a shared secret of the dashboard's replicas"
    one, two = TestClient(create_app(backend, secret=secret)), TestClient(create_app(backend, secret=secret))
    token = page_token(one.get("/queue/q").text)
    two.cookies.set(*csrf_cookie(one))
    assert two.post("/act/pause", data={"queue": "q", "csrf": token}, follow_redirects=False).status_code == 303
    assert backend.paused() == ["q"]


def test_a_sibling_subdomain_cannot_act_even_with_a_valid_token(backend: RedisQueueBackend) -> None:
    client = TestClient(create_app(backend))
    token = page_token(client.get("/queue/q").text)
    refused: list[dict[str, str]] = [
        {"Origin": SIBLING, "Sec-Fetch-Site": "same-site"},
        {"Origin": SIBLING},
        {"Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": "null"},
        {"Origin": "http://testserver.evil.example.com"},
        {"Origin": "http://testserver:8080"},
        {"Referer": SIBLING + "/attack.html"},
        {"Origin": "http://testserver", "Sec-Fetch-Site": "same-site"},
    ]
    for headers in refused:
        done = client.post("/act/pause", data={"queue": "q", "csrf": token}, headers=headers)
        assert done.status_code == 403, headers
        assert "refused" in done.text, done.text
    assert backend.paused() == []
    own = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin", "Referer": "http://testserver/queue/q"}
    done = client.post("/act/pause", data={"queue": "q", "csrf": token}, headers=own, follow_redirects=False)
    assert done.status_code == 303 and backend.paused() == ["q"]


def test_over_https_the_token_lives_in_a_host_only_cookie_even_when_mounted(backend: RedisQueueBackend) -> None:
    host = Starlette(routes=[Mount("/ops", app=create_app(backend))])
    client = TestClient(host, base_url="https://ops.example.com")
    page = client.get("/ops/queue/q")
    cookie = page.headers["set-cookie"]
    assert cookie.startswith("__Host-pyfiq_csrf="), cookie
    assert "secure" in cookie.lower() and "path=/;" in cookie.lower() and "domain" not in cookie.lower()
    token = page_token(page.text)
    # A sibling can set a plain cookie for the parent domain; the dashboard never reads it.
    sibling = TestClient(host, base_url="https://ops.example.com")
    sibling.cookies.set("pyfiq_csrf", token, domain="example.com")
    assert sibling.post("/ops/act/pause", data={"queue": "q", "csrf": token}).status_code == 403
    assert backend.paused() == []
    own = {"Origin": "https://ops.example.com", "Sec-Fetch-Site": "same-origin"}
    done = client.post("/ops/act/pause", data={"queue": "q", "csrf": token}, headers=own, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == "/ops/queue/q"
    assert backend.paused() == ["q"]


def test_a_flash_message_the_dashboard_did_not_write_is_not_shown(backend: RedisQueueBackend) -> None:
    client = TestClient(create_app(backend))
    client.cookies.set("pyfiq_flash", quote("Session expired: sign in again at evil.example.com"))
    assert "evil.example.com" not in client.get("/").text
    token = page_token(client.get("/queue/q").text)
    client.cookies.delete("pyfiq_flash")
    done = client.post("/act/pause", data={"queue": "q", "csrf": token})
    assert done.status_code == 200 and '<p class="flash" role="status">paused q</p>' in done.text


# -- bounded dead-letter pages, off the host app's event loop --------------------------------------

BIG = 1 << 20


def enlarge(b: RedisQueueBackend, stream: str, error: str) -> None:
    """Give every dead letter of ``stream`` ``error`` as its message and a traceback ending in it,
    as a worker records a task that raised it."""
    k = b.keys.stream(stream)
    pipe = b.client.pipeline(transaction=True)
    for raw, score in b.client.zrange(k.dead, 0, -1, withscores=True):
        head, _, body = raw.partition(b"\n")
        header = json.loads(head)
        header["error_type"] = "builtins.ValueError"
        header["error"] = error
        header["traceback"] = (
            "Traceback (most recent call last):\n"
            '  File "app/imports.py", line 12, in load\n'
            "    raise ValueError(row)\n"
            f"ValueError: {error}\n"
        )
        pipe.zrem(k.dead, raw).zadd(k.dead, {json.dumps(header).encode() + b"\n" + body: score})
    pipe.execute()


def test_a_page_of_50_dead_letters_of_1_mb_each_is_bounded(backend: RedisQueueBackend) -> None:
    dead_letters(backend, "huge", 50)
    enlarge(backend, "huge", "row rejected: " + "x" * (BIG - len("row rejected: ")))
    page = TestClient(create_app(backend)).get("/dead/huge")
    assert page.status_code == 200
    assert len(page.content) < 2_000_000, len(page.content)
    assert page.text.count('<tr data-task="') == 50
    assert page.text.count("(1,048,576 characters, showing the first 4,000)") == 50, "each error says it was cut"
    assert page.text.count("row rejected: xxxx") == 100, "each error and traceback shows its start"


def test_the_host_app_answers_while_a_huge_dead_letter_page_is_served(
    backend: RedisQueueBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page's read and its rendering each hold off until the host's own route has answered
    while they are under way. Had either run on the host's event loop, that route could not
    answer, and the page would fail: no timing threshold decides this."""
    dead_letters(backend, "huge", 50)
    enlarge(backend, "huge", "x" * BIG)
    pinged = threading.Event()
    overlapped: list[str] = []

    def waits_for_a_ping(step: str, inner: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            pinged.clear()
            if not pinged.wait(30):
                raise AssertionError(f"the host's route did not answer during the page's {step}")
            overlapped.append(step)
            return inner(*args, **kwargs)

        return run

    monkeypatch.setattr(backend.admin, "dead_letter_page", waits_for_a_ping("read", backend.admin.dead_letter_page))
    monkeypatch.setattr(Dashboard, "_render", waits_for_a_ping("render", Dashboard._render))

    async def ping(request: Request) -> PlainTextResponse:
        pinged.set()
        return PlainTextResponse("pong")

    host = Starlette(routes=[Route("/ping", ping), Mount("/ops", app=create_app(backend))])
    with serve(host) as url, httpx.Client(base_url=url, timeout=120) as pinger:
        heavy: dict[str, Any] = {}

        def load() -> None:
            with httpx.Client(base_url=url, timeout=120) as client:
                heavy["response"] = client.get("/ops/dead/huge")

        loader = threading.Thread(target=load)
        loader.start()
        while loader.is_alive():
            assert pinger.get("/ping").text == "pong"
            time.sleep(0.01)
        loader.join()
    assert overlapped == ["read", "render"]
    assert heavy["response"].status_code == 200
    assert heavy["response"].text.count('<tr data-task="') == 50
    assert len(heavy["response"].content) < 2_000_000


# -- bad query parameters -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "said"),
    [
        ("/dead/q?offset=\u00b2", "offset"),
        ("/dead/q?offset=-1", "offset"),
        ("/dead/q?offset=1e3", "offset"),
        ("/dead/q?offset=" + "9" * 30, "offset"),
        ("/dead/q?offset=%D9%A3", "offset"),
        ("/dead/q?reason=nope", "reason"),
        ("/dead/q?stream=other%23x", "stream"),
        ("/queue/q?cursor=\u00b2:0", "cursor"),
        ("/queue/q?cursor=0:\u00b2", "cursor"),
        ("/queue/q?cursor=0", "cursor"),
        ("/queue/q?cursor=99:0", "cursor"),
        ("/queue/q?cursor=0:" + "9" * 30, "cursor"),
        ("/queue/q?q=" + "k" * 2000, "q"),
    ],
)
def test_a_bad_query_parameter_is_a_400_saying_which(backend: RedisQueueBackend, path: str, said: str) -> None:
    enqueue(backend, "q", "app.t", 1)
    dead_letters(backend, "q", 1)
    answer = TestClient(create_app(backend), raise_server_exceptions=False).get(path)
    assert answer.status_code == 400, (path, answer.status_code, answer.text[:300])
    assert said in answer.text, answer.text


# -- security headers -----------------------------------------------------------------------------

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def test_every_response_carries_the_security_headers(backend: RedisQueueBackend) -> None:
    dead_letters(backend, "q", 1)
    client = TestClient(create_app(backend))
    token = page_token(client.get("/queue/q").text)
    answers = [client.get(p) for p in ("/", "/queue/q", "/dead/q", "/replicas", "/assets/dashboard.js")]
    answers += [client.get("/dead/q?offset=x"), client.get("/assets/nope.js")]
    answers += [client.post("/act/purge", data={"queue": "q", "csrf": token})]  # its confirmation page
    answers += [client.post("/act/pause", data={"queue": "q", "csrf": "forged"})]
    assert [a.status_code for a in answers] == [200, 200, 200, 200, 200, 400, 404, 200, 403]
    for answer in answers:
        assert answer.headers.get("content-security-policy") == CSP, answer.request.url
        assert answer.headers.get("x-content-type-options") == "nosniff", answer.request.url
        assert answer.headers.get("referrer-policy") == "same-origin", answer.request.url


# -- dead letters in every shard ------------------------------------------------------------------


def one_stream_per_shard(b: RedisQueueBackend, queue: str) -> list[str]:
    """Streams of the keyed ``queue``, one in each shard (their shard is the crc32 of the name)."""
    by_shard: dict[int, str] = {}
    n = 0
    while len(by_shard) < b.keys.shards:
        by_shard.setdefault(b.keys.shard_of(f"{queue}#k-{n}"), f"{queue}#k-{n}")
        n += 1
    return [by_shard[s] for s in range(b.keys.shards)]


def queue_in_shard(b: RedisQueueBackend, shard: int) -> str:
    return next(f"deep-{n}" for n in range(10_000) if b.keys.shard_of(f"deep-{n}") == shard)


def streams_listed(text: str) -> list[str]:
    select = re.search(r'<select id="stream".*?</select>', text, flags=re.S)
    assert select is not None
    return re.findall(r'<option value="([^"]+)"', select.group(0))


def test_the_dead_letter_page_finds_dead_letters_in_every_shard(wide: RedisQueueBackend) -> None:
    b = wide
    streams = one_stream_per_shard(b, "hooks")
    for stream in streams:
        dead_letters(b, stream, 1)
    for shard in range(b.keys.shards):  # other queues' dead letters, in every shard too
        dead_letters(b, f"other#{one_stream_per_shard(b, 'other')[shard].partition('#')[2]}", 1)
    deep = queue_in_shard(b, 12)
    dead_letters(b, deep, 2)
    client = TestClient(create_app(b))
    text = client.get("/dead/hooks").text
    assert streams_listed(text) == sorted(streams)
    assert "16 dead letters in 16 streams" in text and "more may exist" not in text
    text = client.get(f"/dead/{deep}").text
    assert "No dead letters" not in text and text.count('<tr data-task="') == 2
    overview = re.search(rf'<tr data-queue="{deep}".*?</tr>', client.get("/").text, flags=re.S)
    assert overview is not None and re.search(r'data-col="dead"><a [^>]*>2</a>', overview.group(0))
    found = b.admin.dead_streams_of("hooks")
    assert (found.streams, found.complete, found.shards_scanned) == (sorted(streams), True, 16)


def test_a_dead_letter_page_that_stopped_early_says_how_far_it_got(
    redis_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), shards=2)
    # Enough streams that each shard's dead-letter index is a hash table, scanned a part a step.
    streams = [f"many#k-{n}" for n in range(400)]
    b.transport.lay_out(0, 1)  # raw enqueue calls write no layout
    b.call_many([b.ops.enqueue(s, [(uuid.uuid4().hex, 1, "0", b"x")]) for s in streams])
    time.sleep(0.01)
    b.call_many([b.ops.acquire(s, 1) for s in streams])
    assert {b.keys.shard_of(s) for s in streams} == {0, 1}
    assert all(b.client.object("encoding", b.keys.dlq_index(s)) == b"hashtable" for s in (0, 1))
    monkeypatch.setattr(pages, "SCAN_BUDGET", 100)
    text = TestClient(create_app(b)).get("/dead/many").text
    shown = len(streams_listed(text))
    assert 0 < shown < 400
    said = re.search(r"showing (\d+) streams; more may exist: scanned (\d+) of 2 shards in full", text)
    assert said is not None, text
    assert (int(said.group(1)), int(said.group(2))) == (shown, 0)
    found = b.admin.dead_streams_of("many", budget=100)
    assert not found.complete and found.shards_scanned == 0 and 0 < len(found.streams) < 400
    everything = b.admin.dead_streams_of("many", budget=10**9)
    assert everything.complete and everything.streams == sorted(streams)
    b.close()

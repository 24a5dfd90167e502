"""The work itself on the dashboard, over HTTP without a browser, on the suite's redis-server: a
stream's tasks paged from its head in bounded reads, their arguments decoded, redacted, escaped
and cut short (dead letters' too), a payload that does not decode, the delete and dead-letter of
one pending task (counts, indexes and order kept; refused for a task a running worker was handed,
even under a race with it), their CSRF and read-only defences, and a task found by its id across
a keyed queue."""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from pyfiq import RedisQueueBackend, ResultUnavailable, TaskHandle, ThreadedWorker
from pyfiq.backend.work import SHOWN_PAYLOAD_BYTES
from pyfiq.dashboard import create_app
from pyfiq.dashboard.app import CSRF_COOKIE
from pyfiq.dashboard.tasks import MAX_NODES, hide_secrets
from pyfiq.engine.status import STATUS_SCAN
from pyfiq.functions import Registry
from pyfiq.ops.cli import main
from pyfiq.task import TaskRecord, new_task_id
from tests.support.helpers import unique_prefix, wait_until

SECRET = "hunter2-Sup3r"
SAME_ORIGIN = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}


@pytest.fixture
def backend(redis_server: Any) -> Iterator[RedisQueueBackend]:
    b = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), shards=4, lease_ttl=3.0, poll_interval=0.1)
    yield b
    b.close()


def qname() -> str:
    return f"w-{uuid.uuid4().hex[:8]}"


def put(b: RedisQueueBackend, stream: str, *args: Any, name: str = "app.t", **kwargs: Any) -> str:
    task_id = new_task_id()
    b.enqueue(stream, [(task_id, TaskRecord(name, list(args), kwargs))])
    return task_id


def ids_of(b: RedisQueueBackend, stream: str, which: str = "pending") -> list[str]:
    return [raw[:32].decode() for raw in b.client.lrange(getattr(b.keys.stream(stream), which), 0, -1)]


def token(client: TestClient) -> str:
    client.get("/")
    return str(client.cookies[CSRF_COOKIE])


def rows(page: str) -> dict[str, str]:
    """Task id -> its row's HTML, from a stream page."""
    return dict(re.findall(r'<tr data-task="([0-9a-f]{32})"[^>]*>(.*?)</tr>', page, flags=re.S))


# -- arguments: decoded, redacted, escaped, cut ---------------------------------------------------


def test_arguments_show_redacted_escaped_and_cut_short(backend: RedisQueueBackend) -> None:
    q = qname()
    hidden = put(
        backend,
        q,
        "acme",
        {"login": "bob", "Password": SECRET, "nested": [{"X-Api-Key": SECRET, "ok": 1}]},
        authorization=f"Bearer {SECRET}",
        session_cookie=SECRET,
        refresh_token=SECRET,
    )
    hostile = put(backend, q, "<script>alert(1)</script>\x1b[2J\u202e\x85", note="a\nb")
    big = put(backend, q, *[f"{n:03}" + "x" * 297 for n in range(30)])
    client = TestClient(create_app(backend))
    page = client.get(f"/stream/{q}").text
    assert SECRET not in page, "a secret reached the page"
    shown = rows(page)
    assert set(shown) == {hidden, hostile, big}
    assert "&#39;login&#39;: &#39;bob&#39;" in shown[hidden] and "&lt;redacted&gt;" in shown[hidden]
    whole = re.search(r"<pre>(.*?)</pre>", shown[hidden], flags=re.S)
    assert whole is not None and "<summary>" in shown[hidden], "longer arguments open from their first line"
    assert whole.group(1).count("&lt;redacted&gt;") == 5, "Password, X-Api-Key, authorization, cookie, token"
    # HTML is escaped; control characters show as escapes, never raw.
    assert "<script>" not in shown[hostile] and "&lt;script&gt;alert(1)&lt;/script&gt;" in shown[hostile]
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202e]", page), "a raw control character reached the page"
    assert r"\x1b[2J" in shown[hostile] and r"\u202e" in shown[hostile] and r"a\nb" in shown[hostile]
    # A long argument opens from its first line and is cut to a bounded length, saying so.
    assert "<details" in shown[big] and "<summary>" in shown[big]
    cut = re.search(r"\(([0-9,]+) characters, showing the first ([0-9,]+)\)", shown[big])
    assert cut is not None and int(cut.group(1).replace(",", "")) > 9000 and cut.group(2) == "4,000"
    assert "&#39;013x" in shown[big] and "&#39;014x" not in shown[big], "the first 4,000 characters only"
    assert len(shown[big]) < 6000, "the row holds a bounded part of the arguments"
    # The dead letters show them the same way.
    assert backend.admin.dead_letter_task(q, hidden).done
    dead = client.get(f"/dead/{q}").text
    assert SECRET not in dead and "&lt;redacted&gt;" in dead and "&#39;login&#39;: &#39;bob&#39;" in dead


def test_secrets_in_pairs_form_fields_and_other_names_are_hidden_too(backend: RedisQueueBackend) -> None:
    q = qname()
    put(
        backend,
        q,
        [["Authorization", f"Bearer {SECRET}"], ("accept", "json")],  # headers as a list of pairs
        fields=[{"name": "password", "value": SECRET}, {"name": "user", "value": "bob"}],
        pwd=SECRET,
        passphrase=SECRET,
        private_key=SECRET,
        credentials=SECRET,
    )
    page = TestClient(create_app(backend)).get(f"/stream/{q}").text
    assert SECRET not in page, "a secret reached the page"
    assert "&#39;accept&#39;, &#39;json&#39;" in page and "&#39;value&#39;: &#39;bob&#39;" in page


def test_a_page_of_payloads_near_the_limit_stays_bounded(backend: RedisQueueBackend) -> None:
    """Fifty payloads just under max_payload_bytes took seconds and gigabytes to show: a page
    decodes at most SHOWN_PAYLOAD_BYTES of each, and the redaction looks at MAX_NODES values."""
    q = qname()
    large = put(backend, q, items=[{}] * (SHOWN_PAYLOAD_BYTES // 3))
    nested = put(backend, q, items=[{"password": SECRET}] * 2000)  # under the payload bound
    shown = rows(TestClient(create_app(backend)).get(f"/stream/{q}").text)
    assert "arguments not shown: a payload of" in shown[large]
    assert SECRET not in shown[nested] and "&lt;redacted&gt;" in shown[nested]
    hidden = hide_secrets([{"a": 1}] * (MAX_NODES * 4))
    assert repr(hidden[-1]) == "<...>", "past MAX_NODES values the rest is not walked"
    assert repr(hidden[10]) == "{'a': 1}"


def test_the_apps_redact_decides_and_one_that_raises_hides_the_arguments(backend: RedisQueueBackend) -> None:
    q = qname()
    put(backend, q, "4111 1111 1111 1111", SECRET, name="billing.charge")
    put(backend, q, "public", name="other.task")

    def redact(name: str, args: list[Any], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        if name == "billing.charge":
            return ["card ending " + args[0][-4:], "<hidden>"], kwargs
        raise RuntimeError(f"no rule for {name}")

    page = TestClient(create_app(backend, redact=redact)).get(f"/stream/{q}").text
    assert SECRET not in page and "4111 1111" not in page
    assert "card ending 1111" in page
    assert "arguments hidden: the redact function raised RuntimeError" in page and "public" not in page
    # Without redact= the default hides only what is named like a secret: positional values show.
    assert SECRET in TestClient(create_app(backend)).get(f"/stream/{q}").text


def test_a_payload_that_does_not_decode_shows_a_note_not_an_error(backend: RedisQueueBackend) -> None:
    q = qname()
    k = backend.keys.stream(q)
    good = put(backend, q, 1)
    bad = new_task_id()
    backend.client.rpush(k.pending, f"{bad}|1700000000000|0|".encode() + b"\xff{not json", b"\x00garbage <b>")
    client = TestClient(create_app(backend))
    response = client.get(f"/stream/{q}")
    assert response.status_code == 200
    shown = rows(response.text)
    assert "cannot decode the arguments: JSONSerializer cannot decode the payload" in shown[bad]
    assert 'data-action="delete"' in shown[bad], "a task whose payload is unreadable can still be removed"
    assert response.text.count("cannot decode the arguments") == 2
    assert "&lt;b&gt;" not in response.text and "<b>" not in response.text, "a malformed entry's bytes are not shown"
    assert response.text.count('data-action="delete"') == 2, "a malformed entry offers no removal"
    assert backend.admin.dead_letter_task(q, bad).done
    dead = client.get(f"/dead/{q}")
    assert dead.status_code == 200 and "cannot decode the arguments" in dead.text
    assert ids_of(backend, q)[0] == good


# -- paging: bounded reads from the head -----------------------------------------------------------


def page_cost(b: RedisQueueBackend, stream: str, offset: int) -> dict[str, int]:
    b.client.config_resetstat()
    b.admin.task_page(stream, offset=offset)
    stats = b.client.info("commandstats")
    return {k: int(v["calls"]) for k, v in stats.items() if not k.startswith(("cmdstat_config", "cmdstat_info"))}


def test_the_stream_page_pages_from_the_head_in_bounded_reads(backend: RedisQueueBackend) -> None:
    q = qname()
    ids = [new_task_id() for _ in range(3000)]
    for start in range(0, 3000, 500):
        backend.enqueue(q, [(i, TaskRecord("app.t", [n], {})) for n, i in enumerate(ids[start : start + 500], start)])
    client = TestClient(create_app(backend))
    first = client.get(f"/stream/{q}").text
    assert list(rows(first)) == ids[:50]
    assert re.findall(r'data-col="place">([0-9,]+)<', first)[-1] == "49"
    assert f'href="/stream/{q}?stream={q}&amp;offset=50">Next page' in first
    last = client.get(f"/stream/{q}", params={"offset": 2950}).text
    assert list(rows(last)) == ids[2950:] and "Next page" not in last and "First page" in last
    assert "No tasks from this place on" in client.get(f"/stream/{q}", params={"offset": 5000}).text
    # What a page costs Redis does not grow with the stream: one MULTI of fixed reads, then TIME.
    small = page_cost(backend, q, 0)
    for i in range(3000, 20_000, 1000):
        backend.enqueue(q, [(new_task_id(), TaskRecord("app.t", [n], {})) for n in range(i, i + 1000)])
    assert page_cost(backend, q, 0) == small == page_cost(backend, q, 15_000)
    assert small["cmdstat_lrange"] == 2 and sum(small.values()) <= 14, small
    for bad in ({"offset": "-1"}, {"offset": "²"}, {"offset": "1" * 16}, {"stream": "other#k"}):
        assert client.get(f"/stream/{q}", params=bad).status_code == 400, bad


# -- delete and move: counts, indexes, order --------------------------------------------------------


def worker_for(
    b: RedisQueueBackend, q: str, ran: list[int], gate: threading.Event | None = None, pace: float = 0.0
) -> ThreadedWorker:
    registry = Registry(b)

    @registry.fifo(queue=q, name=f"{q}.t", max_retries=0)
    def t(n: int) -> None:
        if gate is not None and n == 0:
            gate.wait(20)
        time.sleep(pace)
        ran.append(n)

    return ThreadedWorker(b, registry=registry, queues=[q], concurrency=2, replica=f"r-{q}")


def test_delete_and_move_keep_counts_indexes_and_the_order_of_the_rest(backend: RedisQueueBackend) -> None:
    q = qname()
    stream = f"{q}#acct-1"
    ids = [put(backend, stream, n, name=f"{q}.t") for n in range(6)]
    k = backend.keys.stream(stream)
    gone = backend.admin.delete_task(q, ids[1], "acct-1", place=1)
    assert gone.done and gone.outcome == "deleted" and gone.name == f"{q}.t"
    moved = backend.admin.dead_letter_task(q, ids[3], "acct-1", place=7)  # a stale place: found anyway
    assert moved.outcome == "dead_lettered"
    assert backend.admin.delete_task(q, ids[1], "acct-1").outcome == "not_found", "deleted once"
    assert ids_of(backend, stream) == [ids[0], ids[2], ids[4], ids[5]]
    info = backend.queue_info(stream)
    assert (info["pending"], info["inflight"], info["dead"]) == (4, 0, 1)
    (letter,) = backend.dead_letters(stream)
    assert letter.task_id == ids[3] and letter.reason == "operator"
    assert letter.header["error"] == "moved to the dead letters by an operator"
    assert backend.client.hget(k.dead_ids, ids[3]) is not None and backend.client.hget(k.dead_ids, ids[1]) is None
    assert backend.dead_letter_streams() == [stream]
    assert backend.task_status(stream, ids[3]).state == "skipped"
    assert backend.task_status(stream, ids[1]).state == "unknown"
    ran: list[int] = []
    with worker_for(backend, q, ran):
        wait_until(lambda: len(ran) == 4, message="the four tasks left to run")
        time.sleep(0.3)
        assert ran == [0, 2, 4, 5], "the deleted and the moved task never ran; the rest kept their order"
        assert backend.requeue_dead_letters(stream, task_id=ids[3]) == 1
        wait_until(lambda: len(ran) == 5, message="the requeued task to run")
    assert ran == [0, 2, 4, 5, 3]
    # A stream emptied by a removal that nobody holds is forgotten, as a claim would forget it.
    last = put(backend, stream, 9)
    assert backend.admin.delete_task(q, last, "acct-1").done
    assert backend.admin.stream_page(q).rows == [] and backend.client.exists(k.meta, k.pending) == 0
    # Its dedup key stays for its window, as a task that ran keeps it: a repeat is a duplicate.
    (first,) = backend.enqueue(stream, [(new_task_id(), TaskRecord("app.t", [], {}))], dedup_keys=["order-77"])
    assert backend.admin.delete_task(q, first[0], "acct-1").done
    again = backend.enqueue(stream, [(new_task_id(), TaskRecord("app.t", [], {}))], dedup_keys=["order-77"])
    assert [tuple(s) for s in again] == [(first[0], False)] and ids_of(backend, stream) == []


def test_a_deleted_tasks_status_and_result_say_so_however_deep_it_was(backend: RedisQueueBackend) -> None:
    """A status read looks through the first STATUS_SCAN pending tasks only; a task deleted
    from deeper than that must still read as ended, or its result() would wait forever."""
    q = qname()
    stream = f"{q}#deep"
    tasks = [(new_task_id(), TaskRecord(f"{q}.t", [n], {})) for n in range(STATUS_SCAN + 5)]
    for at in range(0, len(tasks), 500):
        backend.enqueue(stream, tasks[at : at + 500])
    deep = tasks[-1][0]
    assert backend.task_status(stream, deep).searched_all is False, "deeper than a status read looks"
    assert backend.admin.delete_task(q, deep, "deep", place=len(tasks) - 1).done
    status = backend.task_status(stream, deep)
    assert status.state == "unknown" and status.searched_all and "deleted by an operator" in status.detail
    started = time.monotonic()
    with pytest.raises(ResultUnavailable, match="deleted by an operator"):
        TaskHandle(deep, q, stream, f"{q}.t", backend=backend).result(timeout=10)
    assert time.monotonic() - started < 5, "the wait ended at once"
    assert backend.task_status(stream, tasks[-2][0]).searched_all is False, "the others are still there"


def test_a_task_a_running_worker_was_handed_is_refused_and_runs_once(backend: RedisQueueBackend) -> None:
    """Tasks taken ahead sit in the worker's buffer while its head runs: a delete or a move of any
    of them is refused and they run, once, in order. A delete that removed one would report it
    deleted while the worker still ran it (and its acknowledgement then failed)."""
    q = qname()
    gate = threading.Event()
    ran: list[int] = []
    ids = [put(backend, q, n, name=f"{q}.t") for n in range(40)]
    worker = worker_for(backend, q, ran, gate).start()
    try:
        wait_until(lambda: len(ids_of(backend, q, "inflight")) > 3, message="the worker to take tasks ahead")
        flying = ids_of(backend, q, "inflight")
        waiting = ids_of(backend, q)
        assert flying[0] == ids[0] and set(flying) | set(waiting) == set(ids)
        for task_id in flying:
            place = ids.index(task_id)
            for removal in (
                backend.admin.delete_task(q, task_id, place=place),
                backend.admin.dead_letter_task(q, task_id, place=place),
            ):
                assert removal.outcome == "in_flight" and not removal.done, removal
                assert removal.detail.startswith("refused: ") and f"r-{q}" in removal.detail
        assert "running on" in backend.admin.delete_task(q, ids[0]).detail
        assert "took it ahead" in backend.admin.delete_task(q, flying[-1]).detail
        assert ids_of(backend, q, "inflight")[: len(flying)] == flying and backend.queue_info(q)["dead"] == 0
        # The rule the refusal gives: pause the stream, its holder hands back what it took
        # ahead once its running task ends, and the task can then be removed.
        backend.pause(q)
        gate.set()
        wait_until(lambda: flying[-1] in ids_of(backend, q), message="the tasks taken ahead to come back")
        assert backend.admin.delete_task(q, flying[-1]).done
        assert waiting and backend.admin.delete_task(q, waiting[-1]).done
        backend.resume(q)
        wait_until(lambda: len(ran) == 38, timeout=20, message="the other tasks to run")
        time.sleep(0.3)
        assert worker.healthy
    finally:
        gate.set()
        worker.stop(10)
    dropped = {ids.index(flying[-1]), ids.index(waiting[-1])}
    assert ran == [n for n in range(40) if n not in dropped], "each other task once, in order"


def test_deletes_racing_a_draining_worker_never_run_a_deleted_task_nor_lose_order(
    backend: RedisQueueBackend,
) -> None:
    """Deletes aimed where the worker is: at the last task it has taken (refused) and at the next
    pending ones, which it may take between the read and the delete (the script decides)."""
    q = qname()
    ran: list[int] = []
    ids = [put(backend, q, n, name=f"{q}.t") for n in range(300)]
    number = {task_id: n for n, task_id in enumerate(ids)}
    outcomes: dict[int, list[str]] = {}
    worker = worker_for(backend, q, ran, pace=0.002).start()
    try:
        wait_until(lambda: len(ran) >= 2, message="the worker to drain")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and backend.queue_info(q)["pending"]:
            for task_id in ids_of(backend, q, "inflight")[-1:] + ids_of(backend, q)[:1]:
                outcome = backend.admin.delete_task(q, task_id, place=0).outcome
                outcomes.setdefault(number[task_id], []).append(outcome)
        deleted = {n for n, seen in outcomes.items() if "deleted" in seen}
        wait_until(lambda: len(ran) + len(deleted) == 300, timeout=20, message="the stream to drain")
        time.sleep(0.3)
        assert worker.healthy
    finally:
        worker.stop(10)
    seen = [o for os in outcomes.values() for o in os]
    assert seen.count("in_flight") >= 3 and seen.count("deleted") >= 3, seen
    assert all(os.count("deleted") <= 1 for os in outcomes.values())
    assert ran == [n for n in range(300) if n not in deleted], "deleted tasks never ran; the others once, in order"


# -- the actions: confirmation, CSRF, read-only ----------------------------------------------------


def test_the_actions_ask_first_need_the_token_and_say_when_refused(backend: RedisQueueBackend) -> None:
    q = qname()
    stream = f"{q}#k-1"
    ids = [put(backend, stream, n, name="app.ship") for n in range(4)]
    client = TestClient(create_app(backend))
    form = {"queue": q, "stream": stream, "id": ids[2], "place": "2"}
    good = token(client)
    assert client.post("/act/delete", data=form).status_code == 403, "no token"
    assert client.post("/act/delete", data={**form, "csrf": "x" * 43}).status_code == 403
    cross = client.post("/act/delete", data={**form, "csrf": good}, headers={"Sec-Fetch-Site": "cross-site"})
    assert cross.status_code == 403
    sibling = client.post("/act/dead-letter", data={**form, "csrf": good}, headers={"Origin": "https://evil.example"})
    assert sibling.status_code == 403
    ask = client.post("/act/delete", data={**form, "csrf": good}, headers=SAME_ORIGIN)
    assert ask.status_code == 200 and f"Delete task {ids[2]} (app.ship) of {stream}" in ask.text
    assert "waiting in" in ask.text and ids_of(backend, stream) == ids, "nothing happens before the confirmation"
    done = client.post("/act/delete", data={**form, "csrf": good, "confirmed": "1"}, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == f"/stream/{q}?stream={q}%23k-1"
    assert ids_of(backend, stream) == [ids[0], ids[1], ids[3]]
    flashed = client.get(done.headers["location"]).text
    assert f"task {ids[2]} (app.ship) of &#39;{stream}&#39; deleted" in flashed
    # A task a holder was handed: asked, said, and refused with nothing changed.
    backend.call(backend.ops.acquire(stream, 1, holder="web-7"))
    held = {**form, "id": ids[0], "place": "0", "csrf": good}
    ask = client.post("/act/dead-letter", data=held)
    assert "this will be refused" in ask.text
    done = client.post("/act/dead-letter", data={**held, "confirmed": "1"})
    assert f"refused: task {ids[0]} is running on web-7" in done.text
    assert backend.queue_info(stream)["dead"] == 0 and ids_of(backend, stream, "inflight") == [ids[0]]
    moved = client.post("/act/dead-letter", data={**form, "id": ids[3], "place": "1", "csrf": good, "confirmed": "1"})
    assert "moved to the dead letters (reason operator)" in moved.text
    (letter,) = backend.dead_letters(stream)
    assert letter.task_id == ids[3] and letter.header["error"] == "moved to the dead letters from the dashboard"
    assert client.post("/act/delete", data={**form, "id": "nope", "csrf": good}).status_code == 400


def test_read_only_offers_no_task_action(backend: RedisQueueBackend) -> None:
    q = qname()
    task_id = put(backend, q, 1)
    client = TestClient(create_app(backend, read_only=True))
    page = client.get(f"/stream/{q}").text
    assert task_id in page and "<form" not in page and "<button" not in page and "data-action" not in page
    for action in ("delete", "dead-letter"):
        assert client.post(f"/act/{action}", data={"queue": q, "id": task_id}).status_code in (404, 405)
    assert ids_of(backend, q) == [task_id]


# -- a task by its id across a queue ----------------------------------------------------------------


def test_a_task_is_found_by_its_id_alone_or_the_page_says_what_it_needs(backend: RedisQueueBackend) -> None:
    q = qname()
    waiting = [put(backend, f"{q}#c-{i}", i) for i in range(3)]
    dead = put(backend, f"{q}#c-9", 9)
    assert backend.admin.dead_letter_task(q, dead, "c-9").done
    unkeyed = [put(backend, q, n) for n in range(3)]
    deep = [put(backend, f"{q}#c-0", n) for n in range(200)][-1]
    client = TestClient(create_app(backend))

    def state(task_id: str, **params: str) -> tuple[str, str]:
        text = client.get(f"/task/{q}", params={"id": task_id, **params}).text
        found = re.search(r'data-stat="state">(\w+)<', text)
        assert found is not None, text
        return found.group(1), text

    pending, text = state(waiting[1])
    assert pending == "pending" and f"{q}#c-1" in text and 'data-stat="place">0<' in text
    assert f'href="/stream/{q}?stream={q}%23c-1"' in text
    assert state(dead)[0] == "skipped"
    place, text = state(unkeyed[2])
    assert place == "pending" and f"?stream={q}&amp;offset=2" in text
    unknown, text = state(deep)
    assert unknown == "unknown" and "found only with its stream key" in text
    assert state(deep, key="c-0")[0] == "pending", "with its key it is found"
    # The search is bounded: a read-only status call per stream held or waiting longest.
    assert backend.admin.find_task(q, deep).searched.count("first 100 pending tasks") == 1


def test_the_cli_deletes_and_dead_letters_one_pending_task(backend: RedisQueueBackend, redis_server: Any) -> None:
    q = qname()
    ids = [put(backend, f"{q}#k", n) for n in range(3)]
    base = ["--redis", redis_server.url, "--prefix", backend.keys.prefix, "--shards", "4"]
    runner = CliRunner()
    done = runner.invoke(main, ["task", "delete", *base, q, ids[0], "--stream", "k"])
    assert done.exit_code == 0 and f"task {ids[0]} (app.t) of '{q}#k' deleted" in done.output
    done = runner.invoke(main, ["task", "dead-letter", *base, q, ids[1], "--stream", "k", "--reason", "bad data"])
    assert done.exit_code == 0 and "moved to the dead letters" in done.output
    assert backend.dead_letters(f"{q}#k")[0].header["error"] == "bad data"
    backend.call(backend.ops.acquire(f"{q}#k", 1))
    refused = runner.invoke(main, ["task", "delete", *base, q, ids[2], "--stream", "k", "--place", "0"])
    assert refused.exit_code == 1 and "refused: task" in refused.output
    assert ids_of(backend, f"{q}#k", "inflight") == [ids[2]]


def test_the_page_the_removals_and_the_search_run_on_redis_cluster(cluster_backend: RedisQueueBackend) -> None:
    """Every key of a stream shares its shard's slot: the page's MULTI, each removal's script
    and the search's pipelines across streams run on a cluster as on one Redis."""
    b = cluster_backend
    q = qname()
    streams = [f"{q}#c-{i}" for i in range(6)]
    ids = {s: [put(b, s, n, password=SECRET) for n in range(3)] for s in streams}
    assert len({b.keys.stream(s).shard for s in streams}) > 1
    for s in streams:
        key = s.partition("#")[2]
        page = b.admin.task_page(s)
        assert [t.id for t in page.tasks] == ids[s] and page.pending == 3
        assert b.admin.delete_task(q, ids[s][0], key, place=0).done
        assert b.admin.dead_letter_task(q, ids[s][2], key, place=1).done
        assert ids_of(b, s) == [ids[s][1]] and b.queue_info(s)["dead"] == 1
    found = b.admin.find_task(q, ids[streams[4]][1])
    assert found.found and found.status.stream == streams[4] and found.status.state == "pending"
    assert b.admin.find_task(q, ids[streams[5]][2]).status.state == "skipped"
    client = TestClient(create_app(b))
    page = client.get(f"/stream/{q}", params={"stream": streams[3]}).text
    assert ids[streams[3]][1] in page and SECRET not in page

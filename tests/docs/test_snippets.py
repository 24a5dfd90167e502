"""Every ```python block of the documentation and the README runs as written, against the
suite's own Redis.

One runner process (``snippet_runner.py``) runs all blocks once per session, a forked child per
block, several at once; each test below reads one block's verdict. The rule a page follows is in
``snippets.py`` and CONTRIBUTING.md: a block that cannot run alone says so with the line
``<!-- fragment -->`` right above it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.docs.snippets import (
    FRAGMENT,
    OUTPUT,
    ROOT,
    Block,
    blocks_of,
    expected_outputs,
    for_the_suite,
    page_blocks,
    python_blocks,
)
from tests.support.servers import RedisServer

HERE = Path(__file__).resolve().parent
BLOCKS = page_blocks()
RUNNABLE = [b for b in python_blocks(BLOCKS) if not b.fragment]
EXPECTED = expected_outputs(BLOCKS)
#: Blocks the runner also runs, to show that its guard and its URL rule hold.
PROBES = {
    "probe:forbidden-port": "import redis\nredis.Redis(host='127.0.0.1', port=6379).ping()\n",
    "probe:local-url": (
        "import os, redis\n"
        "client = redis.Redis.from_url('redis://localhost:6379/0')\n"
        "client.set('probe', 1)\n"
        "kwargs = client.connection_pool.connection_kwargs\n"
        "print(kwargs['port'], kwargs['db'], os.environ['PYFIQ_REDIS_URL'].endswith(f\"/{kwargs['db']}\"))\n"
    ),
}
#: Blocks at once: the suite's machine has 2 cores, and most snippets wait on Redis or a worker.
PARALLEL = 4
TIMEOUT = 30.0
#: Databases of the suite's server the other tests leave alone (they use 0), one per block at once.
DATABASES = list(range(16 - PARALLEL, 16))


@pytest.fixture(scope="session")
def verdicts(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    work = tmp_path_factory.mktemp("snippets")
    jobs = [
        {"id": b.id, "file": str(ROOT / b.page), "line": b.line, "source": b.source, "test_file": b.test_file}
        for b in RUNNABLE
    ]
    jobs += [{"id": n, "file": n, "line": 0, "source": s, "test_file": None} for n, s in PROBES.items()]
    config = {
        "jobs": jobs,
        "redis": redis_server.url.rsplit("/", 1)[0],
        "databases": DATABASES,
        "timeout": TIMEOUT,
        "workdir": str(work / "run"),
    }
    (work / "jobs.json").write_text(json.dumps(config))
    done = subprocess.run(
        [sys.executable, str(HERE / "snippet_runner.py"), str(work / "jobs.json"), str(work / "results.json")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results: dict[str, dict[str, Any]] = json.loads((work / "results.json").read_text())
    return results


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.id)
def test_the_block_runs_as_written(block: Block, verdicts: dict[str, dict[str, Any]]) -> None:
    verdict = verdicts[block.id]
    assert verdict["ok"], f"{block.id} failed:\n{verdict['stdout']}\n{verdict['stderr']}"
    if block.id in EXPECTED:
        assert verdict["stdout"] == EXPECTED[block.id], f"{block.id} printed other than its output block says"


def test_a_snippet_cannot_reach_the_developers_redis(verdicts: dict[str, dict[str, Any]]) -> None:
    verdict = verdicts["probe:forbidden-port"]
    assert not verdict["ok"] and "tried to reach 127.0.0.1:6379" in verdict["stderr"]


def test_a_local_redis_url_names_the_suites_server(
    verdicts: dict[str, dict[str, Any]], redis_server: RedisServer
) -> None:
    verdict = verdicts["probe:local-url"]
    assert verdict["ok"], verdict["stderr"]
    port, db, same = verdict["stdout"].split()
    assert int(port) == redis_server.port and int(db) in DATABASES and same == "True"
    # It wrote to a database set aside for the snippets, not to the one the other tests use.
    assert redis_server.client().exists("probe") == 0


def test_the_runner_ran_every_runnable_block_and_nothing_else(verdicts: dict[str, dict[str, Any]]) -> None:
    assert set(verdicts) == {b.id for b in RUNNABLE} | set(PROBES)


def test_the_pages_hold_runnable_python() -> None:
    """The rule is not satisfied by marking everything a fragment."""
    python = python_blocks(BLOCKS)
    assert len(RUNNABLE) >= 30 and len(RUNNABLE) >= 2 * (len(python) - len(RUNNABLE)), (len(RUNNABLE), len(python))


def test_the_block_rule_reads_fences_markers_and_test_files() -> None:
    text = "\n".join(
        [
            "# Page",
            "```python",
            "print('a')",
            "```",
            "",
            OUTPUT,
            "```text",
            "a",
            "```",
            FRAGMENT,
            "```python",
            "charge('c-1', 5)",
            "```",
            "- a list item:",
            "",
            "    ```python",
            "    # test_x.py",
            "    def test_x():",
            "        pass",
            "    ```",
            "````markdown",
            "```python",
            "inside another block",
            "```",
            "````",
        ]
    )
    blocks = blocks_of(text, "p.md")
    assert [(b.line, b.language, b.fragment) for b in blocks] == [
        (2, "python", False),
        (7, "text", False),
        (11, "python", True),
        (16, "python", False),
        (21, "markdown", False),
    ]
    assert blocks[0].source == "print('a')\n" and blocks[3].source == "# test_x.py\ndef test_x():\n    pass\n"
    assert blocks[3].test_file == "test_x.py" and blocks[0].test_file is None
    assert expected_outputs(blocks) == {"p.md:2": "a\n"}


def test_only_the_local_redis_is_pointed_at_the_suite() -> None:
    url = "redis://127.0.0.1:5555/13"
    source = "a('redis://localhost') b('redis://localhost:6379/0') c(\"redis://127.0.0.1:6379\")\n"
    assert for_the_suite(source, url) == f"a('{url}') b('{url}') c(\"{url}\")\n"
    untouched = "RedisQueueBackend('rediss://cache:6380/0'), 'redis://node-1:6379', 'redis://localhost:6390/0'"
    assert for_the_suite(untouched, url) == untouched


def test_the_readme_quick_start_is_among_the_blocks_run() -> None:
    """The README follows the pages' rule: its quick start runs, and prints what it says."""
    readme = [b for b in RUNNABLE if b.page == "README.md"]
    assert readme and all(b.id in EXPECTED for b in readme), [b.id for b in readme]
    assert any("threaded_worker" in b.source and "@fifo" in b.source for b in readme)

"""Fixtures of the dashboard's tests: one headless Chromium for the browser tests (Debian's
``chromium`` through Playwright), and a scene with tasks in every state on the suite's own
redis-server. A missing browser fails the tests; it never skips them."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from tests.dashboard.scene import Scene, build_scene


def chromium_path() -> str:
    path = os.environ.get("PYFIQ_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail(
            "chromium is not installed: run scripts/test.sh (it installs it as root with apt-get), "
            "'sudo apt-get install chromium', or set PYFIQ_CHROMIUM to a Chromium binary"
        )
    return path


# Module scope: the browser tests live in one module, so the browser still starts once per run,
# and it is closed right after them. Playwright's sync API keeps an event loop running in the
# main thread while it is open, and asyncio.run() in any later test would refuse to start.
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # *.example.test names this machine: the dashboard and a sibling subdomain's page can be
        # served on loopback under the hostnames of one site.
        args = ["--no-sandbox", "--host-resolver-rules=MAP *.example.test 127.0.0.1"]
        chromium = p.chromium.launch(executable_path=chromium_path(), args=args, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(10_000)
    yield context.new_page()
    context.close()


@pytest.fixture
def scene(redis_server: Any) -> Iterator[Scene]:
    built = build_scene(redis_server.url)
    yield built
    built.stop_workers()
    built.backend.close()

"""The screenshots of the dashboard in docs/operations/dashboard.md: the overview, a queue, the dead letters, the
replicas, a queue's last hour, the overview on a 480 px wide screen, a stream's tasks and a
task found by its id.

    python scripts/screenshots.py [--out docs/img]

Builds the scene of the dashboard's browser tests (``tests/dashboard/scene.py``: tasks in every
state) on a redis-server of its own, serves the dashboard with uvicorn and photographs it in
headless Chromium through Playwright (``$PYFIQ_CHROMIUM`` or the ``chromium`` on the path).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyfiq_harness.servers import RedisProcess  # noqa: E402
from tests.dashboard.scene import build_scene, dashboard, enqueue, serve  # noqa: E402


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default=str(ROOT / "docs" / "img"), show_default=True)
def main(out: str) -> None:
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("PYFIQ_CHROMIUM") or shutil.which("chromium")
    if not chromium:
        raise click.ClickException("chromium is not installed: 'apt-get install chromium' or set PYFIQ_CHROMIUM")
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    server = RedisProcess(Path(tempfile.mkdtemp(prefix="pyfiq-shots-")), appendfsync=None).start()
    scene = build_scene(server.url)
    try:
        with serve(dashboard(scene, refresh=0)) as url, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"], headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 720}, device_scale_factor=1)
            page.goto(url + "/")
            page.screenshot(path=str(target / "overview.png"), full_page=True)
            page.goto(url + "/queue/stuck")
            page.screenshot(path=str(target / "queue.png"), full_page=True)
            page.goto(url + "/dead/work")
            page.locator("#dead summary").first.click()
            page.screenshot(path=str(target / "dead-letters.png"), full_page=True)
            page.goto(url + "/replicas")
            page.screenshot(path=str(target / "replicas.png"), full_page=True)
            page.goto(url + "/queue/work")
            page.locator("#history").screenshot(path=str(target / "history.png"))
            narrow = browser.new_page(viewport={"width": 480, "height": 720}, device_scale_factor=1)
            narrow.goto(url + "/")
            narrow.screenshot(path=str(target / "narrow.png"), full_page=True)
            shoot_tasks(scene.backend, page, url, target)
            browser.close()
    finally:
        scene.stop_workers()
        scene.backend.close()
        server.stop()
    click.echo(
        "wrote overview.png, queue.png, dead-letters.png, replicas.png, history.png, narrow.png, "
        f"stream.png and task.png to {target}"
    )


def shoot_tasks(backend: Any, page: Any, url: str, target: Path) -> None:
    """A stream's tasks (its head running, arguments redacted, one opened) and a task of a keyed
    stream found by its id alone. The tasks join the stuck queue behind its head, which never
    ends."""
    accounts = [("globex", "eu-1"), ("initech", "us-2"), ("umbrella", "eu-1")]
    ids = [
        enqueue(backend, "stuck", "scene.sync_crm", name, {"region": region, "api_token": "tok-" + name * 3})
        for name, region in accounts
    ]
    enqueue(backend, "stuck", "scene.sync_crm", "hooli", {"fields": [f"custom_{i}" for i in range(30)]})
    page.goto(url + "/stream/stuck")
    page.locator(f'#tasks tr[data-task="{ids[-1]}"]').scroll_into_view_if_needed()
    page.locator("#tasks details summary").last.click()
    page.screenshot(path=str(target / "stream.png"), full_page=True)
    found = enqueue(backend, "hooks#c-2", "app.deliver", {"event": 2})
    page.goto(url + "/queue/hooks")
    page.fill("#task-id", found)  # its id alone: the search finds its stream
    page.get_by_role("button", name="Find task").click()
    page.screenshot(path=str(target / "task.png"), full_page=True)


if __name__ == "__main__":
    main()

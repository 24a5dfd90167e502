"""The probes an orchestrator asks a worker process (``pyfiq worker --health-port``):

- ``GET /healthz`` (liveness): 200 while the worker runs as it should, 503 once one of its
  threads died (the worker then stops itself: restarting the process is the cure);
- ``GET /readyz`` (readiness): 200 while the worker is healthy and Redis answered within the
  last ``unreachable_after`` seconds, else 503 (a Redis outage is not cured by a restart, so it
  never fails liveness).

Each probe of readiness pings Redis once: nothing is sent between probes. Bodies are one JSON
object saying why.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Health:
    """What the probes answer, from the worker's health and a ping of Redis."""

    def __init__(self, healthy: Callable[[], bool], ping: Callable[[], bool], unreachable_after: float) -> None:
        self.healthy, self.ping, self.unreachable_after = healthy, ping, unreachable_after
        self._last_ok = time.monotonic()
        self._lock = threading.Lock()

    def live(self) -> tuple[int, dict[str, Any]]:
        ok = self.healthy()
        return (200 if ok else 503), {"live": ok}

    def ready(self) -> tuple[int, dict[str, Any]]:
        try:
            answered = self.ping()
        except Exception:
            answered = False
        now = time.monotonic()
        with self._lock:
            if answered:
                self._last_ok = now
            silent = now - self._last_ok
        healthy = self.healthy()
        ok = healthy and silent <= self.unreachable_after
        body: dict[str, Any] = {"ready": ok, "live": healthy, "redis_unreachable_s": round(silent, 1)}
        return (200 if ok else 503), body


def serve(health: Health, host: str, port: int) -> ThreadingHTTPServer:
    """Serve ``/healthz`` and ``/readyz`` in a daemon thread; ``shutdown()`` ends it."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            routes = {"/healthz": health.live, "/readyz": health.ready}
            route = routes.get(self.path.split("?", 1)[0])
            status, body = route() if route is not None else (404, {"error": "try /healthz or /readyz"})
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # probes every few seconds are not worth a log line each

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="pyfiq-health", daemon=True).start()
    return server

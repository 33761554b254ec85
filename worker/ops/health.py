"""What /livez, /readyz and /metrics answer, and the small HTTP server that serves them.

Liveness: every supervised task beats; a task that has not beaten within its bound, or a
stuck partition, makes /livez fail. Readiness: Kafka and Postgres answered the last probe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
from prometheus_client import make_wsgi_app

WsgiStartResponse = Callable[[str, list[tuple[str, str]]], Any]


class Liveness:
    def __init__(self) -> None:
        self._bounds: dict[str, float] = {}
        self._beats: dict[str, float] = {}
        self.stuck_partitions: list[str] = []

    def register(self, task: str, bound_seconds: float) -> None:
        self._bounds[task] = bound_seconds
        self._beats[task] = time.monotonic()

    def beat(self, task: str) -> None:
        self._beats[task] = time.monotonic()

    def problems(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        silent = [
            f"task {task} silent for {now - self._beats[task]:.0f} s"
            for task, bound in sorted(self._bounds.items())
            if now - self._beats[task] > bound
        ]
        return silent + [f"partition {name} stuck" for name in self.stuck_partitions]


@dataclass
class Readiness:
    checks: dict[str, bool] = field(default_factory=dict)

    def set(self, service: str, answered: bool) -> None:
        self.checks[service] = answered

    def problems(self) -> list[str]:
        if not self.checks:
            return ["not probed yet"]
        return [f"{service} unreachable" for service, ok in sorted(self.checks.items()) if not ok]


def health_app(liveness: Liveness, readiness: Readiness) -> Callable[..., Iterable[bytes]]:
    metrics_app = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: WsgiStartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/livez":
            return _answer(start_response, liveness.problems())
        if path == "/readyz":
            return _answer(start_response, readiness.problems())
        return metrics_app(environ, start_response)  # type: ignore[no-any-return]

    return app


def _answer(start_response: WsgiStartResponse, problems: list[str]) -> list[bytes]:
    status = "503 Service Unavailable" if problems else "200 OK"
    start_response(status, [("Content-Type", "application/json")])
    return [orjson.dumps({"ok": not problems, "problems": problems})]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds would flood the logs."""


def serve_health(port: int, app: Callable[..., Iterable[bytes]]) -> WSGIServer:
    """Serves on a daemon thread: probes answer even while the event loop is busy."""
    server = make_server("0.0.0.0", port, app, handler_class=_QuietHandler)  # noqa: S104
    threading.Thread(target=server.serve_forever, name="health-http", daemon=True).start()
    return server

"""What /livez, /readyz and /metrics answer, and the small HTTP server that serves them.

Liveness: every supervised task beats; a task that has not beaten within its bound, or a
stuck partition, makes /livez fail. Readiness: Kafka and Postgres answered the last probe.

The server takes each connection on its own daemon thread, up to a limit, and gives each one
a deadline for the whole exchange: idle or slow-loris clients neither block the probes nor
pile up threads, and stopping the server waits for none of them.
"""

from __future__ import annotations

import io
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import orjson
from prometheus_client import make_wsgi_app

WsgiStartResponse = Callable[[str, list[tuple[str, str]]], Any]
# A probe or a scrape sends a few hundred bytes and reads a few dozen kB: 5 s is ample, even
# on a loaded node, and bounds how long any client holds a thread.
REQUEST_SECONDS = 5.0
# Threads at once; a connection beyond is closed unanswered. Far above what the kubelet and
# Prometheus use (one or two each), and a few MiB of stacks at most.
MAX_CONNECTIONS = 200


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


class _DeadlineSocketIO(io.RawIOBase):
    """The connection's socket, for reading and writing until `deadline` (monotonic) only:
    each call's timeout is the time left, so a client that sends a byte now and then cannot
    stretch the exchange, as it could with a plain per-read timeout."""

    def __init__(self, connection: socket.socket, deadline: float) -> None:
        self._connection = connection
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self._connection.settimeout(self._time_left())
        return self._connection.recv_into(buffer)

    def write(self, data: Any) -> int:
        self._connection.settimeout(self._time_left())
        self._connection.sendall(data)
        return len(data)

    def _time_left(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("health request deadline passed")
        return left


class _HealthRequestHandler(WSGIRequestHandler):
    def setup(self) -> None:
        super().setup()
        deadline = time.monotonic() + cast("HealthServer", self.server).request_seconds
        channel = _DeadlineSocketIO(self.connection, deadline)
        self.rfile = io.BufferedReader(channel)
        self.wfile = channel  # type: ignore[assignment]

    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds would flood the logs."""

    def get_stderr(self) -> io.StringIO:
        """Where wsgiref prints the traceback of an answer that failed, a write past the
        deadline included: discarded, not on stderr among the JSON log lines (a failed
        probe answer shows as the probe failing)."""
        return io.StringIO()


class HealthServer(ThreadingMixIn, WSGIServer):
    """One daemon thread per connection, at most `max_connections` at once."""

    daemon_threads = True
    block_on_close = False  # server_close() waits for no client
    request_queue_size = 128  # a burst of connections waits to be accepted, not refused

    def __init__(
        self, address: tuple[str, int], request_seconds: float, max_connections: int
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _HealthRequestHandler)
        self.request_seconds = request_seconds
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that timed out or went away is not worth a traceback on stderr (the
        default, for every one); anything else still gets it."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


def serve_health(
    port: int,
    app: Callable[..., Iterable[bytes]],
    host: str = "0.0.0.0",  # noqa: S104 - the kubelet and Prometheus connect from outside
    *,
    request_seconds: float = REQUEST_SECONDS,
    max_connections: int = MAX_CONNECTIONS,
) -> HealthServer:
    """Serves on a daemon thread: probes answer even while the event loop is busy. Stop it
    with shutdown() then server_close(); neither waits for a client."""
    server = HealthServer((host, port), request_seconds, max_connections)
    server.set_app(app)
    threading.Thread(target=server.serve_forever, name="health-http", daemon=True).start()
    return server

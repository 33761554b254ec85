"""The probes' HTTP server under hostile clients: idle connections and slow-loris senders
must not keep /livez, /readyz and /metrics from answering, and stopping the server leaves
no thread behind. Real sockets on loopback; nothing else runs."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from worker.ops import metrics  # noqa: F401 - registers the worker's metrics
from worker.ops.health import Liveness, Readiness, health_app, serve_health

PROBE_BUDGET_SECONDS = 1.0


@contextmanager
def health_server(**options: float) -> Iterator[int]:
    readiness = Readiness()
    readiness.set("kafka", answered=True)
    readiness.set("postgres", answered=True)
    server = serve_health(0, health_app(Liveness(), readiness), host="127.0.0.1", **options)
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def get(port: int, path: str, timeout: float = PROBE_BUDGET_SECONDS) -> tuple[int, float]:
    """The status code of a GET and how long it took (TimeoutError past `timeout`)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(f"GET {path} HTTP/1.1\r\nHost: probe\r\n\r\n".encode())
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    if not answer:
        raise ConnectionError("closed unanswered")
    status = int(answer.split(b" ", 2)[1])
    return status, time.monotonic() - started


class SlowLoris:
    """Clients that started a request and send one header byte every `interval` seconds."""

    def __init__(self, port: int, count: int, interval: float) -> None:
        self.sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
        for client in self.sockets:
            client.sendall(b"GET /livez HTTP/1.1\r\nX-Slow: ")
        self._interval = interval
        self._stop = threading.Event()
        self.dropped = 0
        self._thread = threading.Thread(target=self._drip, daemon=True)
        self._thread.start()

    def _drip(self) -> None:
        while not self._stop.wait(self._interval):
            for client in list(self.sockets):
                try:
                    client.sendall(b"a")
                except OSError:
                    self.sockets.remove(client)
                    client.close()
                    self.dropped += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for client in self.sockets:
            client.close()


@contextmanager
def idle_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    """Connected and silent."""
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    try:
        yield sockets
    finally:
        for client in sockets:
            client.close()


def test_probes_answer_within_a_second_while_idle_and_slow_clients_hold_connections() -> None:
    with health_server() as port, idle_connections(port, 100):
        loris = SlowLoris(port, 20, interval=0.3)
        try:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                for path in ("/livez", "/readyz", "/metrics"):
                    status, took = get(port, path)
                    assert status == 200, path
                    assert took < PROBE_BUDGET_SECONDS, (path, took)
                time.sleep(0.2)
        finally:
            loris.close()


def test_a_slow_loris_client_is_dropped_at_the_request_deadline(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A byte every 100 ms resets any per-read timeout; the deadline covers the whole
    request, so the server closes the connection once it is past, quietly (no traceback
    among the JSON log lines)."""
    with health_server(request_seconds=0.5) as port:
        loris = SlowLoris(port, 3, interval=0.1)
        try:
            time.sleep(2)
            assert loris.dropped == 3
        finally:
            loris.close()
    assert capfd.readouterr().err == ""


def test_an_idle_connection_is_closed_at_the_request_deadline() -> None:
    with health_server(request_seconds=0.5) as port, idle_connections(port, 1) as [client]:
        client.settimeout(3)
        started = time.monotonic()
        assert client.recv(1) == b"", "closed without an answer"
        assert time.monotonic() - started < 2


def test_connections_beyond_the_limit_are_closed_at_once_and_probes_answer_again_after() -> None:
    with health_server(max_connections=5, request_seconds=0.5) as port:
        with idle_connections(port, 5):
            time.sleep(0.2)  # all five accepted and waiting in their handlers
            with pytest.raises(ConnectionError):  # accepted and closed at once, unanswered
                get(port, "/livez")
        deadline = time.monotonic() + 3
        while True:
            try:
                assert get(port, "/livez")[0] == 200
                break
            except OSError:
                assert time.monotonic() < deadline, "slots never freed"
                time.sleep(0.05)


def test_shutdown_leaves_no_thread_behind_even_with_clients_connected() -> None:
    before = set(threading.enumerate())
    started = time.monotonic()
    with health_server() as port, idle_connections(port, 10):
        loris = SlowLoris(port, 5, interval=0.1)
        assert get(port, "/livez")[0] == 200
        loris.close()
    assert time.monotonic() - started < 3
    left = [thread for thread in set(threading.enumerate()) - before if thread.is_alive()]
    assert not [thread for thread in left if not thread.daemon], "would keep the process alive"
    assert not [thread for thread in left if thread.name == "health-http"]


def test_binds_to_the_address_given() -> None:
    """METRICS_HOST=127.0.0.1 keeps the server off every other interface; IPv6 works too."""
    app = health_app(Liveness(), Readiness())
    for host in ("127.0.0.1", "::1"):
        server = serve_health(0, app, host=host)
        try:
            assert server.server_address[0] == host
        finally:
            server.shutdown()
            server.server_close()

"""The logs are one stream: in JSON mode every line is one JSON object, whoever wrote it
(the worker, aiokafka or asyncpg through the standard library, asyncio, Python's warnings
and unraisable errors), each with the service's version and the replica that wrote it; in
console mode without a terminal, no ANSI colour codes."""

from __future__ import annotations

import ast
import asyncio
import logging
import re
import sys
import warnings
from collections.abc import Iterator
from importlib.metadata import version
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
import structlog

from tests.support import REPO_ROOT
from worker.ops.logs import configure_logging, log_unhandled_asyncio_error
from worker.settings import Settings

REPLICA = "license-worker-7d9f-abcde"


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """Gives the logging configuration back after a test that calls configure_logging."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    unraisable_hook = sys.unraisablehook
    try:
        yield
    finally:
        structlog.configure(**saved)
        root.handlers[:] = handlers
        root.setLevel(level)
        sys.unraisablehook = unraisable_hook
        logging.captureWarnings(False)


def raised(error: BaseException) -> BaseException:
    try:
        raise error
    except BaseException as caught:
        return caught


def write_every_kind_of_line() -> None:
    structlog.get_logger("worker.service").info("worker.starting")
    logging.getLogger("aiokafka").error('Unable connect to "127.0.0.1:9"')
    logging.getLogger("aiokafka.consumer.group_coordinator").warning("Heartbeat failed")
    logging.getLogger("asyncio").error("Unclosed connection")
    logging.getLogger().warning("a stdlib line from the root logger")
    warnings.warn("a deprecated call", DeprecationWarning, stacklevel=1)
    loop = asyncio.new_event_loop()
    try:
        log_unhandled_asyncio_error(
            loop, {"message": "Task exception was never retrieved", "exception": raised(OSError())}
        )
    finally:
        loop.close()
    sys.unraisablehook(
        SimpleNamespace(  # type: ignore[arg-type]
            exc_type=ValueError,
            exc_value=raised(ValueError("I/O operation on closed file.")),
            exc_traceback=None,
            err_msg="Exception ignored in",
            object=None,
        )
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = [line for line in text.splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}")
    return parsed


def test_every_line_in_json_mode_is_json_with_the_version_and_the_replica(
    restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info", "json", replica=REPLICA)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        write_every_kind_of_line()
    captured = capsys.readouterr()
    lines = json_lines(captured.err)
    assert captured.out == ""
    assert len(lines) == 8, lines
    for line in lines:
        assert line["version"] == version("license-telemetry"), line
        assert line["replica"] == REPLICA, line
        assert "event" in line
        assert "level" in line
    assert "I/O operation on closed file" not in captured.err, "never the error's message"
    assert "Traceback" not in captured.err


def test_console_mode_without_a_terminal_has_no_colour_codes(
    restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info", "console", replica=REPLICA)
    structlog.get_logger("worker.service").warning("worker.starting", attempt=1)
    logging.getLogger("aiokafka").error("Unable connect")
    err = capsys.readouterr().err
    assert "worker.starting" in err
    assert "Unable connect" in err
    assert "\x1b[" not in err


def test_the_replica_is_the_host_name_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REPLICA_ID", raising=False)
    monkeypatch.setenv("HOSTNAME", "license-worker-5c7d-xk2p9")
    assert Settings().replica_id == "license-worker-5c7d-xk2p9"
    monkeypatch.setenv("REPLICA_ID", "eu-1")
    assert Settings().replica_id == "eu-1"


# The areas of docs/operations.md, "Logs": every event is `<area>.<event>`.
AREAS = {
    "worker",
    "startup",
    "ingest",
    "admin",
    "database",
    "kafka",
    "relay",
    "sweep",
    "lease",
    "monitor",
    "migration",
    "erasure",
    "security",
    "command",
    "asyncio",
    "python",
}
LOG_METHODS = {"debug", "info", "warning", "error", "critical", "exception"}


def logged_event_names() -> dict[str, str]:
    """Every event name a `log.<level>("name", ...)` call in worker/ writes, with its place."""
    names = {}
    for path in sorted((REPO_ROOT / "worker").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LOG_METHODS
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                names[node.args[0].value] = f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
    return names


def test_every_event_name_is_area_dot_event_and_documented() -> None:
    names = logged_event_names()
    assert len(names) > 40, "the scan finds the worker's log calls"
    operations = (REPO_ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    for name, place in names.items():
        assert re.fullmatch(r"[a-z_]+\.[a-z_]+", name), (name, place)
        area = name.split(".")[0]
        assert area in AREAS, f"{name} ({place}): not one of the documented areas"
        assert f"`{name}`" in operations, f"{name} ({place}) is not in docs/operations.md"


def test_a_fresh_brokers_coordinator_wait_is_not_an_error(
    restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """aiokafka logs the wait for a fresh broker's group coordinator at error level (the demo
    on a clean machine printed it twice): shown at info, only when info is logged; every other
    aiokafka error stays an error."""
    coordinator = logging.getLogger("aiokafka.consumer.group_coordinator")
    wait = "Group Coordinator Request failed: [Error 15] GroupCoordinatorNotAvailableError"
    configure_logging("warning", "json", replica=REPLICA)
    # As aiokafka logs it: the error is an argument of the format.
    coordinator.error(
        "Group Coordinator Request failed: %s", "[Error 15] GroupCoordinatorNotAvailableError"
    )
    coordinator.error("Error sending JoinGroupRequest_v2 to node 1 [NodeNotReadyError]")
    lines = json_lines(capsys.readouterr().err)
    assert [(line["event"][:29], line["level"]) for line in lines] == [
        ("Error sending JoinGroupReques", "error")
    ]
    configure_logging("info", "json", replica=REPLICA, library_level="info")
    coordinator.error(wait)
    [line] = json_lines(capsys.readouterr().err)
    assert (line["event"], line["level"]) == (wait, "info")

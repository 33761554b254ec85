"""The libraries' logs (asyncpg's pool, aiokafka, through the standard library's `logging`)
and asyncio's unhandled errors come out as the worker's own lines: one JSON object each in
JSON mode, an error by its class, never a traceback or the error's message."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import asyncpg
import orjson
import pytest
import structlog

from worker.ops.logs import configure_logging, log_unhandled_asyncio_error

EMAIL = "alice@contoso.example"


@pytest.fixture
def json_logs() -> Iterator[None]:
    """Gives the logging configuration back after a test that calls `configure`."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        structlog.configure(**saved)
        root.handlers[:] = handlers
        root.setLevel(level)


def configure() -> None:
    """JSON mode, writing to the stderr of the test's call (capsys's)."""
    configure_logging("info", "json")


def lines_of(text: str) -> list[dict[str, Any]]:
    """Every line of `text` as JSON (fails on one that is not)."""
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


def raised(error: BaseException) -> BaseException:
    try:
        raise error
    except BaseException as caught:
        return caught


def test_an_outage_in_a_library_log_is_one_line_with_the_class(
    json_logs: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure()
    error = raised(asyncpg.CannotConnectNowError("the database system is shutting down"))
    logging.getLogger("asyncpg.pool").warning(
        "Failed to restore the pool connection floor; retrying", exc_info=error
    )
    err = capsys.readouterr().err
    [line] = lines_of(err)
    assert line["event"] == "Failed to restore the pool connection floor; retrying"
    assert line["logger"] == "asyncpg.pool"
    assert line["level"] == "warning"
    assert line["error"] == "CannotConnectNowError"
    assert line["sqlstate"] == "57P03"
    assert "timestamp" in line
    assert "raised_at" not in line, "an expected outage needs no place"
    assert "Traceback" not in err
    assert "shutting down" not in err, "never the error's message"


def test_an_unexpected_error_in_a_library_log_says_where_not_what(
    json_logs: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure()
    logging.getLogger("aiokafka").error("callback failed", exc_info=raised(ValueError(EMAIL)))
    err = capsys.readouterr().err
    [line] = lines_of(err)
    assert line["error"] == "ValueError"
    assert any("raised" in frame for frame in line["raised_at"])
    assert EMAIL not in err
    assert "Traceback" not in err


def test_library_info_lines_are_left_out(
    json_logs: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure()
    logging.getLogger("aiokafka").info("joined group")
    assert capsys.readouterr().err == ""


async def test_an_error_nobody_awaited_is_one_structured_line(
    json_logs: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure()
    loop = asyncio.get_running_loop()
    error = raised(ConnectionResetError(104, "Connection reset by peer"))
    log_unhandled_asyncio_error(
        loop, {"message": "Future exception was never retrieved", "exception": error}
    )
    log_unhandled_asyncio_error(loop, {"message": "Exception in callback"})
    err = capsys.readouterr().err
    first, second = lines_of(err)
    assert first["event"] == "asyncio.unhandled_error"
    assert first["message"] == "Future exception was never retrieved"
    assert first["error"] == "ConnectionResetError"
    assert second["message"] == "Exception in callback"
    assert "Traceback" not in err

"""Errors in logs: class, SQLSTATE and place, never the message (it may quote personal data)."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest
from click.testing import CliRunner

from worker import cli, service
from worker.clock import FixedClock
from worker.licensing import sweeper as sweeper_module
from worker.licensing.sweeper import Sweeper
from worker.ops.logs import crash_fields, error_fields
from worker.settings import Settings

EMAIL = "alice@contoso.example"


def postgres_error() -> asyncpg.PostgresError:
    error = asyncpg.InvalidTextRepresentationError(f'invalid input syntax for type uuid: "{EMAIL}"')
    error.sqlstate = "22P02"  # type: ignore[attr-defined]
    return error


def test_error_fields_name_the_class_and_sqlstate_only() -> None:
    assert error_fields(postgres_error()) == {
        "error": "InvalidTextRepresentationError",
        "sqlstate": "22P02",
    }
    assert error_fields(ValueError(EMAIL)) == {"error": "ValueError"}


def raise_deep(depth: int) -> None:
    if depth == 0:
        raise postgres_error()
    raise_deep(depth - 1)


def test_crash_fields_say_where_without_the_message() -> None:
    try:
        raise_deep(3)
    except asyncpg.PostgresError as error:
        fields = crash_fields(error, frames=2)
    assert fields["error"] == "InvalidTextRepresentationError"
    assert fields["sqlstate"] == "22P02"
    raised_at = fields["raised_at"]
    assert isinstance(raised_at, list)
    assert len(raised_at) == 2
    assert raised_at[-1].endswith(" raise_deep")
    assert "test_error_logging.py:" in raised_at[-1]
    assert EMAIL not in repr(fields)


class RecordingLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def error(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))


async def test_a_failed_sweep_logs_no_error_message(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FixedClock(datetime.now(UTC))
    sweeper = Sweeper(Settings(), repository=None, end_offsets=None, clock=clock)  # type: ignore[arg-type]

    async def fail(**_: Any) -> None:
        raise postgres_error()

    recording = RecordingLog()
    monkeypatch.setattr(sweeper, "_run", fail)
    monkeypatch.setattr(sweeper_module, "log", recording)
    await sweeper._run_logged()
    assert recording.lines == [
        ("sweep.failed", {"error": "InvalidTextRepresentationError", "sqlstate": "22P02"})
    ]


def test_a_crashing_worker_logs_class_and_place_not_the_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def crash(self: object) -> None:
        raise postgres_error()

    monkeypatch.setattr(service.Worker, "run", crash)
    monkeypatch.setenv("LOG_FORMAT", "json")
    monkeypatch.delenv("PSEUDONYM_KEY_FILE", raising=False)
    monkeypatch.setenv("PSEUDONYM_KEY", secrets.token_hex(32))  # `run` needs one
    result = CliRunner().invoke(cli.main, ["run"])
    assert result.exit_code == 1
    assert EMAIL not in result.output
    [line] = [orjson.loads(text) for text in result.output.splitlines() if "worker.crashed" in text]
    assert line["error"] == "InvalidTextRepresentationError"
    assert line["sqlstate"] == "22P02"
    assert line["level"] == "critical"
    assert any(" crash" in frame for frame in line["raised_at"])

"""`sweep.waiting_for_ingestion` says how far behind ingestion is, and only when that is
known: a worker that has stored nothing yet (every start of a fresh deployment) does not
warn with `decision_time=None lag_seconds=None`."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from tests.integration.license_support import ALICE_DEVICES, day, ingest, send, sweep
from tests.support import Services, make_settings
from worker.settings import Settings


@pytest.fixture
def settings(services: Services, database_url: str, topics: dict[str, str]) -> Settings:
    return make_settings(services, database_url, topics, sweep_enabled=False)


def waiting_lines(logs: list[dict[str, object]]) -> list[dict[str, object]]:
    return [
        line
        for line in logs
        if line["event"] == "sweep.waiting_for_ingestion" and line["log_level"] != "debug"
    ]


async def test_nothing_stored_yet_is_not_warned_about(
    services: Services, settings: Settings
) -> None:
    await send(services, settings, [(d, "install", day(0)) for d in ALICE_DEVICES])
    with capture_logs() as logs:
        report = await sweep(settings, day(31))
    assert report.waited_for_lag, "still nothing is released while nothing is stored"
    assert report.released == 0
    assert waiting_lines(logs) == []


async def test_a_known_lag_is_warned_about_with_its_numbers(
    services: Services, settings: Settings
) -> None:
    events = [(d, "install", day(0)) for d in ALICE_DEVICES]
    events += [(d, "heartbeat", day(0)) for d in ALICE_DEVICES]
    total = await send(services, settings, events)
    await ingest(services, settings, day(0), total)
    await send(services, settings, [(d, "heartbeat", day(1)) for d in ALICE_DEVICES])
    with capture_logs() as logs:
        await sweep(settings, day(31))
    [line] = waiting_lines(logs)
    assert isinstance(line["lag_seconds"], float)
    assert line["lag_seconds"] > 0
    assert line["decision_time"] is not None

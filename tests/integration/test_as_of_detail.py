"""`report usage --as-of` with each device's user, kind, install state and last seen as they
stood then, replayed from the device history (issue #18, part 7), on the real broker and
database."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from openpyxl import load_workbook

from tests.integration.license_support import day, ingest, send, sweep
from tests.support import Services, fetch, make_settings
from worker.db.repository import Repository
from worker.report.build import ReportRequest, write_usage_report
from worker.report.formats import CsvWriter, JsonWriter, ReportWriter
from worker.report.xlsx import XlsxWriter
from worker.settings import Settings
from worker.sim.fleet import SimulatedDevice

pytestmark = pytest.mark.integration

ALICE = "alice@acme.example"
BOB = "bob@acme.example"
# A user id a spreadsheet would run as a formula: exported as text, never as a formula.
FORMULA = '=HYPERLINK("http://evil.example","x")@acme.example'
NOW = day(62)


def laptop(user_id: str, kind: str = "business") -> SimulatedDevice:
    return SimulatedDevice("acme", "shared-laptop", user_id, kind)


@pytest.fixture
def settings(services: Services, database_url: str, topics: dict[str, str]) -> Settings:
    return make_settings(
        services, database_url, topics, sweep_enabled=False, relay_poll_seconds=0.1
    )


class Timeline:
    """Sends events and ingests each step with the worker's clock an hour after them."""

    def __init__(self, services: Services, settings: Settings) -> None:
        self.services, self.settings, self.total = services, settings, 0

    async def step(self, at: datetime, *events: tuple[SimulatedDevice, str]) -> None:
        self.total += await send(
            self.services, self.settings, [(device, kind, at) for device, kind in events]
        )
        await ingest(self.services, self.settings, at + timedelta(hours=1), self.total)


async def moved_and_changed(timeline: Timeline) -> None:
    """The laptop is Alice's from day 0, Bob's from day 10 and personal from day 20
    (a reinstall reports the new kind); uninstalled on day 30, reinstalled on day 35."""
    await timeline.step(day(0), (laptop(ALICE), "install"))
    await timeline.step(day(3), (laptop(ALICE), "heartbeat"))
    await timeline.step(day(10), (laptop(BOB), "heartbeat"))
    await timeline.step(day(15), (laptop(BOB), "heartbeat"))
    await timeline.step(day(20), (laptop(BOB, "personal"), "install"))
    await timeline.step(day(30), (laptop(BOB, "personal"), "uninstall"))
    await timeline.step(day(35), (laptop(BOB, "personal"), "install"))
    await timeline.step(day(36), (laptop(BOB, "personal"), "heartbeat"))


async def write_report(settings: Settings, writer: ReportWriter, as_of: datetime | None) -> None:
    repository = await Repository.connect(settings.database_url.get_secret_value(), 1)
    try:
        request = ReportRequest("acme", as_of, NOW, settings.license_window)
        await write_usage_report(repository, writer, request)
    finally:
        await repository.close()


async def json_rows(settings: Settings, as_of: datetime | None) -> dict[tuple[str, str], Any]:
    out = io.StringIO()
    await write_report(settings, JsonWriter(out), as_of)
    [customer] = orjson.loads(out.getvalue())["customers"]
    return {(row["subject_type"], row["subject_id"]): row for row in customer["rows"]}


def seen(row: dict[str, Any]) -> datetime | None:
    value = row["last_seen_at"]
    return None if value is None else datetime.fromisoformat(value)


async def test_as_of_shows_each_devices_user_and_kind_as_they_stood_then(
    services: Services, settings: Settings
) -> None:
    await moved_and_changed(Timeline(services, settings))

    def device(rows: dict[tuple[str, str], Any]) -> tuple[Any, ...]:
        row = rows[("device", "shared-laptop")]
        return row["user_id"], row["device_kind"], row["status"], row["licensed"]

    day5 = await json_rows(settings, day(5))
    assert device(day5) == (ALICE, "business", "covered_by_user", False)
    assert day5[("user", ALICE)]["status"] == "licensed"
    assert ("user", BOB) not in day5, "Bob was not known on day 5"

    day15 = await json_rows(settings, day(15))
    assert device(day15) == (BOB, "business", "covered_by_user", False)
    assert day15[("user", BOB)]["status"] == "licensed"
    assert day15[("user", ALICE)]["status"] == "released:no_devices"

    day25 = await json_rows(settings, day(25))
    assert device(day25) == (BOB, "personal", "covered_by_user", False)

    # Uninstalled on day 30, reinstalled on day 35.
    day32 = await json_rows(settings, day(32))
    assert device(day32) == (BOB, "personal", "uninstalled", False)
    assert day32[("user", BOB)]["status"] == "released:uninstalled"
    day37 = await json_rows(settings, day(37))
    assert device(day37) == (BOB, "personal", "covered_by_user", False)
    assert day37[("user", BOB)]["status"] == "licensed"

    # The live report is what it always was: today's facts.
    live = await json_rows(settings, None)
    assert device(live) == (BOB, "personal", "covered_by_user", False)
    assert seen(live[("device", "shared-laptop")]) == day(36)
    assert live[("device", "shared-laptop")]["last_seen_exact"] is True


async def test_last_seen_as_of_a_past_day_is_never_after_it(
    services: Services, settings: Settings
) -> None:
    await moved_and_changed(Timeline(services, settings))

    for number in (0.5, 5, 12, 15.5, 25, 31, 35.5, 40):
        rows = await json_rows(settings, day(number))
        laptop_row, bob = rows[("device", "shared-laptop")], rows.get(("user", BOB))
        last_seen = seen(laptop_row)
        assert last_seen is not None, number
        assert last_seen <= day(number), number
        if bob is not None:
            bob_seen = seen(bob)
            assert bob_seen is not None, number
            assert bob_seen <= day(number), number
    # Exact once the device has not been heard from since: its last signal is today's.
    day40 = (await json_rows(settings, day(40)))[("device", "shared-laptop")]
    assert (seen(day40), day40["last_seen_exact"]) == (day(36), True)
    # Otherwise the newest stored signal at or before then: day 3's heartbeat changed
    # nothing and is not kept, so day 5 shows the install of day 0, flagged as a lower bound.
    day5 = (await json_rows(settings, day(5)))[("device", "shared-laptop")]
    assert (seen(day5), day5["last_seen_exact"]) == (day(0), False)
    # The move of day 10 was stored with its signal.
    day12 = (await json_rows(settings, day(12)))[("device", "shared-laptop")]
    assert (seen(day12), day12["last_seen_exact"]) == (day(10), False)


async def test_a_device_silent_past_the_window_shows_inactive_as_of_then(
    services: Services, settings: Settings
) -> None:
    timeline = Timeline(services, settings)
    await timeline.step(day(0), (laptop(ALICE), "install"))
    await sweep(settings, day(31))
    rows = await json_rows(settings, day(32))
    assert rows[("device", "shared-laptop")]["status"] == "inactive"
    assert rows[("user", ALICE)]["status"] == "released:inactive_30d"


async def test_csv_and_xlsx_as_of_carry_user_kind_and_last_seen_as_safe_text(
    services: Services, settings: Settings, tmp_path: Path
) -> None:
    timeline = Timeline(services, settings)
    await timeline.step(day(0), (laptop(FORMULA), "install"))
    await timeline.step(day(10), (laptop(BOB, "personal"), "install"))

    out = io.StringIO()
    await write_report(settings, CsvWriter(out), day(5))
    lines = out.getvalue().splitlines()
    header = next(csv.reader([lines[0]]))
    assert {"user_id", "device_kind", "last_seen_at", "last_seen_exact"} <= set(header)
    [device_line] = [line for line in lines if '"shared-laptop"' in line]
    quoted = FORMULA.replace('"', '""')
    assert f'"\'{quoted}"' in device_line, "quoted, with a leading '"
    device = dict(zip(header, next(csv.reader([device_line])), strict=True))
    assert (device["user_id"], device["device_kind"]) == ("'" + FORMULA, "business")
    assert datetime.fromisoformat(device["last_seen_at"]) == day(0)
    assert device["last_seen_exact"] == "false"

    path = tmp_path / "as-of.xlsx"
    await write_report(settings, XlsxWriter(path), day(5))
    detail = load_workbook(path)["Detail"]
    headings = [cell.value for cell in detail[1]]
    assert "last seen exact" in headings
    rows = [dict(zip(headings, row, strict=True)) for row in detail.iter_rows(2)]
    [cells] = [r for r in rows if r["subject id"].value == "shared-laptop"]
    user = cells["user id"]
    assert (user.value, user.data_type, user.quotePrefix) == (FORMULA, "s", True)
    assert cells["device kind"].value == "business"
    assert cells["last seen (UTC)"].value == day(0).replace(tzinfo=None)
    assert cells["last seen exact"].value is False

    later = await json_rows(settings, day(15))
    assert later[("device", "shared-laptop")]["device_kind"] == "personal"
    assert later[("device", "shared-laptop")]["user_id"] == BOB


async def test_only_changes_are_recorded_not_heartbeats(
    services: Services, settings: Settings
) -> None:
    """The ingest path writes a history row when a device's user, kind or install state
    changes, never one per heartbeat."""
    timeline = Timeline(services, settings)
    await timeline.step(day(0), (laptop(ALICE), "install"))
    for number in range(1, 6):
        await timeline.step(day(number), (laptop(ALICE), "heartbeat"))
    await timeline.step(day(6), (laptop(BOB), "heartbeat"))
    url = services.superuser_url(settings.database_url.get_secret_value())
    rows = await fetch(
        url, "SELECT user_id, device_kind, protected FROM device_history ORDER BY id"
    )
    assert [tuple(row) for row in rows] == [
        (ALICE, "business", True),
        (BOB, "business", True),
    ]


async def test_a_device_first_seen_by_its_uninstall_is_stored_and_recorded_unprotected(
    services: Services, settings: Settings
) -> None:
    """An uninstall is a device's first signal (its install was lost): the device row has no
    protected state yet (NULL), and its history row says not protected instead of refusing
    the whole batch (the batch went to the DLQ as database_rejected before)."""
    timeline = Timeline(services, settings)
    await timeline.step(day(0), (laptop(ALICE), "uninstall"))
    url = services.superuser_url(settings.database_url.get_secret_value())
    rows = await fetch(url, "SELECT user_id, protected FROM device_history ORDER BY id")
    assert [tuple(row) for row in rows] == [(None, False)]  # an uninstall names no user
    stored = await fetch(url, "SELECT protected FROM devices")
    assert [row["protected"] for row in stored] == [None]

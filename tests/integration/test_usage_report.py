"""The usage report against the real broker and database: a fleet licensed by the worker
and the sweeper, then reported live, as of a past time, and as an Excel workbook."""

from __future__ import annotations

import io
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from openpyxl import load_workbook

from tests.integration.license_support import day, ingest, send, sweep
from tests.support import Services, fetch, make_settings
from worker.db.repository import Repository
from worker.report.build import ReportRequest, UnknownCustomerError, write_usage_report
from worker.report.formats import JsonWriter
from worker.report.xlsx import XlsxWriter
from worker.settings import Settings
from worker.sim.fleet import SimulatedDevice

pytestmark = pytest.mark.integration

ALICE = "alice@acme.example"
BOB = "bob@acme.example"
CAROL = "carol@acme.example"
DAVE = "dave@acme.example"


def acme(device_id: str, user_id: str | None, kind: str = "business") -> SimulatedDevice:
    return SimulatedDevice("acme", device_id, user_id, kind)


ACME_FLEET = [
    acme("alice-laptop", ALICE),
    acme("alice-phone", ALICE, "personal"),
    acme("alice-tablet", ALICE, "personal"),
    acme("alice-watch", ALICE, "personal"),  # over allowance
    acme("bob-laptop", BOB),
    acme("bob-laptop-2", BOB),  # over allowance, in bob's group package
    acme("kiosk-1", None),  # unassigned
    acme("carol-laptop", CAROL),  # uninstalled on day 1
    acme("dave-laptop", DAVE),  # silent after day 0
]
# The same ids under another customer, whose license model is `device`.
GLOBEX_FLEET = [
    SimulatedDevice("globex", "alice-laptop", ALICE, "business"),
    SimulatedDevice("globex", "kiosk-1", None, "business"),
]
# An inactive customer: its signals license nothing.
INITECH_FLEET = [SimulatedDevice("initech", "eve-laptop", "eve@initech.example", "business")]
SILENT = {"dave-laptop", "carol-laptop"}


@pytest.fixture
def settings(services: Services, database_url: str, topics: dict[str, str]) -> Settings:
    return make_settings(
        services, database_url, topics, sweep_enabled=False, relay_poll_seconds=0.1
    )


async def set_up_customers(settings: Settings) -> None:
    """What the console would have sent: names, models, status, subscriptions, a group."""
    url = settings.database_url.get_secret_value()
    await fetch(
        url,
        """INSERT INTO customers (customer_id, name, license_model, status) VALUES
               ('acme', 'Acme Corp', 'user', 'active'),
               ('globex', 'Globex', 'device', 'active'),
               ('initech', 'Initech', 'user', 'inactive')""",
    )
    await fetch(
        url,
        """INSERT INTO subscriptions (customer_id, subscription_id, package, group_id, status,
                                      attached_at, status_changed_at) VALUES
               ('acme', 'sub-core', 'core', NULL, 'active', $1, $1),
               ('acme', 'sub-plus', 'core_plus', 'execs', 'active', $1, $1)""",
        day(0),
    )
    await fetch(
        url,
        "INSERT INTO group_members VALUES ('acme', 'execs', $1, true, $2)",
        BOB,
        day(0),
    )


async def license_the_fleet(services: Services, settings: Settings) -> int:
    """Installs on day 0, carol's uninstall on day 1, heartbeats on day 30 from all but the
    silent ones, then the sweep of day 31 releases dave."""
    await set_up_customers(settings)
    fleet = [*ACME_FLEET, *GLOBEX_FLEET, *INITECH_FLEET]
    total = await send(services, settings, [(device, "install", day(0)) for device in fleet])
    await ingest(services, settings, day(0), total)
    total += await send(services, settings, [(acme("carol-laptop", CAROL), "uninstall", day(1))])
    await ingest(services, settings, day(1), total)
    heartbeats = [(d, "heartbeat", day(30)) for d in fleet if d.device_id not in SILENT]
    total += await send(services, settings, heartbeats)
    await ingest(services, settings, day(30), total)
    released = await sweep(settings, day(31))
    assert released.released == 1  # dave
    return total


async def report(
    settings: Settings,
    now: datetime,
    customer_id: str | None = None,
    as_of: datetime | None = None,
) -> dict[str, Any]:
    out = io.StringIO()
    repository = await Repository.connect(settings.database_url.get_secret_value(), 1)
    try:
        request = ReportRequest(customer_id, as_of, now, settings.license_window)
        await write_usage_report(repository, JsonWriter(out), request)
    finally:
        await repository.close()
    document: dict[str, Any] = orjson.loads(out.getvalue())
    return document


def totals_of_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The totals a report should show, recounted from its licensed detail rows."""
    users = sum(1 for r in rows if r["licensed"] and r["subject_type"] == "user")
    reasons = Counter(r["basis"] for r in rows if r["licensed"] and r["subject_type"] == "device")
    packages: dict[str, dict[str, int]] = {}
    for row in rows:
        if row["licensed"]:
            package = packages.setdefault(
                row["package"] or "none",
                {"licensed_users": 0, "device_licenses": 0, "total_licenses": 0},
            )
            package["licensed_users" if row["subject_type"] == "user" else "device_licenses"] += 1
            package["total_licenses"] += 1
    return {
        "licensed_users": users,
        "device_licenses": sum(reasons.values()),
        "device_licenses_by_reason": {
            basis: reasons[basis] for basis in ("unassigned", "over_allowance", "device_model")
        },
        "total_licenses": users + sum(reasons.values()),
        "by_package": dict(sorted(packages.items())),
    }


def by_subject(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["subject_type"], r["subject_id"]): r for r in rows}


async def test_live_report_explains_every_user_and_device_and_its_totals_add_up(
    services: Services, settings: Settings
) -> None:
    await license_the_fleet(services, settings)
    document = await report(settings, day(31))

    assert (document["source"], document["release_window_days"]) == ("live", 30)
    assert [c["customer"]["customer_id"] for c in document["customers"]] == [
        "acme",
        "globex",
        "initech",
    ]
    all_rows = [row for c in document["customers"] for row in c["rows"]]
    for customer in document["customers"]:
        assert customer["totals"] == totals_of_rows(customer["rows"]), customer["customer"]
    assert document["totals"] == totals_of_rows(all_rows)

    acme_report, globex_report, initech_report = document["customers"]
    assert acme_report["customer"] == {
        "customer_id": "acme",
        "name": "Acme Corp",
        "status": "active",
        "license_model": "user",
    }
    assert acme_report["totals"]["by_package"] == {
        "core": {"licensed_users": 1, "device_licenses": 2, "total_licenses": 3},
        "core_plus": {"licensed_users": 1, "device_licenses": 1, "total_licenses": 2},
    }
    rows = by_subject(acme_report["rows"])
    explained = {
        subject: (r["licensed"], r["status"], r["package"], r["devices_covered"])
        for subject, r in rows.items()
    }
    assert explained == {
        ("user", ALICE): (True, "licensed", "core", 3),
        ("user", BOB): (True, "licensed", "core_plus", 1),
        ("user", CAROL): (False, "released:uninstalled", None, 0),
        ("user", DAVE): (False, "released:inactive_30d", None, 0),
        ("device", "alice-laptop"): (False, "covered_by_user", None, None),
        ("device", "alice-phone"): (False, "covered_by_user", None, None),
        ("device", "alice-tablet"): (False, "covered_by_user", None, None),
        ("device", "alice-watch"): (True, "over_allowance", "core", None),
        ("device", "bob-laptop"): (False, "covered_by_user", None, None),
        ("device", "bob-laptop-2"): (True, "over_allowance", "core_plus", None),
        ("device", "kiosk-1"): (True, "unassigned", "core", None),
        ("device", "carol-laptop"): (False, "uninstalled", None, None),
        ("device", "dave-laptop"): (False, "inactive", None, None),
    }
    watch = rows[("device", "alice-watch")]
    assert (watch["user_id"], watch["device_kind"]) == (ALICE, "personal")
    assert datetime.fromisoformat(watch["last_seen_at"]) == day(30)
    # Each user comes before their devices; devices without a user come last.
    order = [r["subject_id"] for r in acme_report["rows"]]
    assert order.index(ALICE) < order.index("alice-laptop") < order.index(BOB)
    assert order[-1] == "kiosk-1"

    assert {
        subject: (r["licensed"], r["status"], r["package"])
        for subject, r in by_subject(globex_report["rows"]).items()
    } == {
        ("user", ALICE): (False, "not_counted", None),
        ("device", "alice-laptop"): (True, "device_model", None),
        ("device", "kiosk-1"): (True, "device_model", None),
    }
    assert globex_report["totals"]["by_package"] == {
        "none": {"licensed_users": 0, "device_licenses": 2, "total_licenses": 2}
    }
    assert [(r["subject_id"], r["status"]) for r in initech_report["rows"]] == [
        ("eve@initech.example", "not_counted"),
        ("eve-laptop", "customer_inactivated"),
    ]
    assert initech_report["totals"]["total_licenses"] == 0

    one = await report(settings, day(31), customer_id="acme")
    assert one["customers"] == [acme_report]
    assert one["totals"] == acme_report["totals"]
    with pytest.raises(UnknownCustomerError):
        await report(settings, day(31), customer_id="nobody")


async def test_as_of_report_equals_what_the_live_report_said_then(
    services: Services, settings: Settings
) -> None:
    total = await license_the_fleet(services, settings)
    then = await report(settings, day(31))

    # Afterwards: a new device, the kiosk uninstalled, everything else falls silent.
    total += await send(
        services,
        settings,
        [
            (acme("erin-laptop", "erin@acme.example"), "install", day(40)),
            (acme("kiosk-1", None), "uninstall", day(40)),
        ],
    )
    await ingest(services, settings, day(40), total)
    later = await sweep(settings, day(62))
    assert later.released >= 4
    now = await report(settings, day(62))
    assert now["totals"] != then["totals"], "the fleet changed after day 31"

    replayed = await report(settings, day(62), as_of=day(31))
    assert replayed["source"] == "history"
    assert replayed["totals"] == then["totals"]

    def licensing(document: dict[str, Any], customer: str) -> dict[Any, Any]:
        [section] = [c for c in document["customers"] if c["customer"]["customer_id"] == customer]
        return {
            subject: (row["licensed"], row["basis"], row["package"])
            for subject, row in by_subject(section["rows"]).items()
            if row["basis"] is not None  # subjects that held a license by then
        }

    assert len(licensing(then, "acme")) == 7  # 4 users, 3 device licenses
    assert len(licensing(then, "globex")) == 2
    for customer in ("acme", "globex", "initech"):
        section = next(c for c in replayed["customers"] if c["customer"]["customer_id"] == customer)
        expected = next(c for c in then["customers"] if c["customer"]["customer_id"] == customer)
        assert section["totals"] == expected["totals"], customer
        assert licensing(replayed, customer) == licensing(then, customer), customer
        assert section["totals"] == totals_of_rows(section["rows"])
    assert ("device", "erin-laptop") not in by_subject(replayed["customers"][0]["rows"])
    dave = by_subject(replayed["customers"][0]["rows"])[("user", DAVE)]
    # Replayed from the device history: dave's laptop, silent since day 0, was his then.
    assert (dave["status"], dave["last_seen_at"], dave["devices_covered"]) == (
        "released:inactive_30d",
        day(0).isoformat(),
        None,
    )
    assert dave["last_seen_exact"] is True

    # Before anything was decided, nothing was licensed; one customer at a time works too.
    empty = await report(settings, day(62), customer_id="acme", as_of=day(0) - timedelta(days=1))
    assert empty["totals"]["total_licenses"] == 0
    assert empty["customers"][0]["rows"] == []

    # Purged users stay in the report under their pseudonym, with nothing personal.
    purge = await sweep(settings, day(125))
    assert purge.purged >= 2
    purged = await report(settings, day(125), customer_id="acme")
    text = orjson.dumps(purged).decode()
    assert CAROL not in text
    assert DAVE not in text
    pseudonyms = [r for r in purged["customers"][0]["rows"] if r["status"] == "purged"]
    assert len(pseudonyms) >= 2
    assert all(r["subject_id"].startswith("purged-") for r in pseudonyms)


async def test_xlsx_report_opens_with_the_expected_cells(
    services: Services, settings: Settings, tmp_path: Path
) -> None:
    await license_the_fleet(services, settings)
    path = tmp_path / "usage.xlsx"
    repository = await Repository.connect(settings.database_url.get_secret_value(), 1)
    try:
        request = ReportRequest(None, None, day(31), settings.license_window)
        await write_usage_report(repository, XlsxWriter(path), request)
    finally:
        await repository.close()

    book = load_workbook(path)
    assert book.sheetnames == ["Summary", "Detail"]
    summary, detail = book["Summary"], book["Detail"]
    assert (summary.freeze_panes, detail.freeze_panes) == ("A2", "A2")
    assert all(detail.column_dimensions[c].width for c in "ABCDEFGHIJK")

    headings = [cell.value for cell in summary[1]]
    customers = [records(headings, row) for row in summary.iter_rows(2, 4, values_only=True)]
    assert [c["customer"] for c in customers] == ["acme", "globex", "initech"]
    acme_row = customers[0]
    assert (acme_row["name"], acme_row["status"], acme_row["license model"]) == (
        "Acme Corp",
        "active",
        "user",
    )
    assert (acme_row["licensed users"], acme_row["over allowance"], acme_row["total licenses"]) == (
        2,
        2,
        5,
    )
    packages = (acme_row["core total"], acme_row["core_plus total"], acme_row["none total"])
    assert packages == (3, 2, 0)
    assert acme_row["as of (UTC)"] == day(31).replace(tzinfo=None)
    assert summary.cell(5, 1).value == "all 3 customers"
    assert summary.cell(5, headings.index("total licenses") + 1).value == 7

    detail_headings = [cell.value for cell in detail[1]]
    rows = [records(detail_headings, r) for r in detail.iter_rows(2, values_only=True)]
    assert len(rows) == len(ACME_FLEET) + 4 + len(GLOBEX_FLEET) + 1 + len(INITECH_FLEET) + 1
    watch = next(r for r in rows if r["customer"] == "acme" and r["subject id"] == "alice-watch")
    assert watch["licensed"] is True
    assert watch["status"] == "over_allowance"
    assert watch["last seen (UTC)"] == day(30).replace(tzinfo=None)
    alice = next(r for r in rows if r["customer"] == "acme" and r["subject id"] == ALICE)
    assert alice["devices covered"] == 3
    assert isinstance(alice["devices covered"], int)
    dave_laptop = next(r for r in rows if r["subject id"] == "dave-laptop")
    assert (dave_laptop["licensed"], dave_laptop["status"]) == (False, "inactive")


def records(headings: list[Any], values: tuple[Any, ...]) -> dict[str, Any]:
    return dict(zip(headings, values, strict=True))

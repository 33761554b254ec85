"""The license engine against the real broker and database, with the clock set by the test."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta

import pytest
from prometheus_client import REGISTRY

from tests.integration.license_support import (
    ALICE,
    ALICE_DEVICES,
    KIOSK,
    billing_view,
    day,
    ingest,
    publish_outbox,
    rows_containing,
    send,
    summary,
    sweep,
)
from tests.support import (
    Services,
    fetch,
    make_settings,
)
from worker.db.repository import Repository
from worker.settings import Settings
from worker.sim.fleet import SimulatedDevice

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(services: Services, database_url: str, topics: dict[str, str]) -> Settings:
    return make_settings(
        services, database_url, topics, sweep_enabled=False, relay_poll_seconds=0.1
    )


async def test_timeline_day_0_29_31_120_emits_exactly_the_expected_events(
    services: Services, settings: Settings
) -> None:
    events = [(d, "install", day(0)) for d in [*ALICE_DEVICES, KIOSK]]
    events += [(d, "heartbeat", day(0) + timedelta(minutes=5)) for d in [*ALICE_DEVICES, KIOSK]]
    total = await send(services, settings, events)
    await ingest(services, settings, day(0) + timedelta(minutes=10), total)
    await publish_outbox(settings)
    allocated = await billing_view(services, settings, 3)
    assert summary(allocated) == Counter(
        {
            ("license.allocated", "alice@acme.example", "first_signal"): 1,
            ("license.allocated", "alice-watch", "first_signal"): 1,
            ("license.allocated", "kiosk-1", "first_signal"): 1,
        }
    )
    assert {e["basis"] for e in allocated} == {"user", "over_allowance", "unassigned"}

    day29 = await sweep(settings, day(29))
    assert (day29.released, day29.purged) == (0, 0)
    in_use = {
        basis: REGISTRY.get_sample_value(
            "license_worker_licenses_active", {"subject_type": subject, "basis": basis}
        )
        for subject, basis in [
            ("user", "user"),
            ("device", "unassigned"),
            ("device", "over_allowance"),
        ]
    }
    assert in_use == {"user": 1, "unassigned": 1, "over_allowance": 1}
    assert REGISTRY.get_sample_value("license_worker_customers_licensed") == 1

    day31 = await sweep(settings, day(31))
    assert day31.released == 3
    released_at = day(30) + timedelta(minutes=5)
    after_31 = await billing_view(services, settings, 8)
    releases = [e for e in after_31 if e["type"] == "license.released"]
    assert summary(releases) == Counter(
        {
            ("license.released", "alice@acme.example", "inactive_30d"): 1,
            ("license.released", "alice-watch", "inactive_30d"): 1,
            ("license.released", "kiosk-1", "inactive_30d"): 1,
        }
    )
    assert {datetime.fromisoformat(e["effective_at"]) for e in releases} == {released_at}

    day120 = await sweep(settings, day(120) + timedelta(minutes=5))
    assert day120.purged == 1
    final = await billing_view(services, settings, 10)
    purges = [e for e in final if e["type"] == "user.purged"]
    assert len(final) == 10, "nothing but the expected events"
    # One customer, one partition: billing reads the events in the order they were decided.
    # Each sweep on a new day ends with the customer's daily usage snapshot.
    assert [e["type"] for e in final] == [
        *["license.allocated"] * 3,
        "usage.snapshot",
        *["license.released"] * 3,
        "usage.snapshot",
        "user.purged",
        "usage.snapshot",
    ]
    snapshots = [e for e in final if e["type"] == "usage.snapshot"]
    assert [(s["day"], s["licensed_users"], s["total_licenses"]) for s in snapshots] == [
        (day(29).date().isoformat(), 1, 3),
        (day(31).date().isoformat(), 0, 0),
        (day(120).date().isoformat(), 0, 0),
    ]
    assert snapshots[0]["device_licenses_by_reason"] == {
        "unassigned": 1,
        "over_allowance": 1,
        "device_model": 0,
    }
    assert [(e["reason"], e["subject_id"].startswith("purged-")) for e in purges] == [
        ("retention_90d", True)
    ]

    # Nothing personal survives the purge, in any table.
    for needle in ("alice@acme.example", "User alice@acme.example", "host-alice-laptop"):
        assert await rows_containing(settings, needle) == [], needle


async def test_late_heartbeat_reactivates_and_future_heartbeat_is_clamped(
    services: Services, settings: Settings
) -> None:
    total = await send(services, settings, [(KIOSK, "install", day(0))])
    await ingest(services, settings, day(0), total)
    await sweep(settings, day(31))  # released: silent since day 0
    # Arrives on day 31, sent by the agent on day 20 (it was offline): inside 30 days.
    total += await send(services, settings, [(KIOSK, "heartbeat", day(20))])
    await ingest(services, settings, day(31), total)
    await publish_outbox(settings)
    events = [e for e in await billing_view(services, settings, 4) if e["type"] != "usage.snapshot"]
    assert [(e["type"], e["reason"]) for e in sorted(events, key=lambda e: e["sequence"])] == [
        ("license.allocated", "first_signal"),
        ("license.released", "inactive_30d"),
        ("license.allocated", "reactivated"),
    ]
    # The late signal of day 20 shows the kiosk counted on: licensed again from the release
    # (day 30), not from day 20, which would bill days 20 to 30 twice (intervals never overlap).
    reactivation = next(e for e in events if e["reason"] == "reactivated")
    assert datetime.fromisoformat(reactivation["effective_at"]) == day(30)

    total += await send(services, settings, [(KIOSK, "heartbeat", day(400))])  # agent clock ahead
    await ingest(services, settings, day(31), total)
    [device] = await fetch(
        settings.database_url.get_secret_value(), "SELECT last_seen_at FROM devices"
    )
    assert device["last_seen_at"] == day(31) + settings.future_tolerance


async def test_uninstall_releases_at_once_and_never_counts(
    services: Services, settings: Settings
) -> None:
    phone = ALICE_DEVICES[1]
    events = [(ALICE, "install", day(0)), (phone, "install", day(0)), (phone, "uninstall", day(1))]
    total = await send(services, settings, events)
    await ingest(services, settings, day(1), total)
    total += await send(services, settings, [(ALICE, "uninstall", day(2))])
    await ingest(services, settings, day(2), total)
    await publish_outbox(settings)
    events_seen = await billing_view(services, settings, 2)
    assert summary(events_seen) == Counter(
        {
            ("license.allocated", "alice@acme.example", "first_signal"): 1,
            ("license.released", "alice@acme.example", "uninstalled"): 1,
        }
    )
    released = next(e for e in events_seen if e["type"] == "license.released")
    assert datetime.fromisoformat(released["effective_at"]) == day(2)


async def test_sweeper_waits_while_ingestion_lags(services: Services, settings: Settings) -> None:
    events = [(d, "install", day(0)) for d in ALICE_DEVICES]
    events += [(d, "heartbeat", day(0)) for d in ALICE_DEVICES]
    total = await send(services, settings, events)
    await ingest(services, settings, day(0), total)
    # Newer heartbeats wait in Kafka, unconsumed: the worker is down.
    await send(services, settings, [(d, "heartbeat", day(1)) for d in ALICE_DEVICES])
    report = await sweep(settings, day(31))
    assert report.waited_for_lag
    assert report.released == 0, "our own lag must not look like 30 days of silence"
    assert report.decision_time is not None
    assert report.decision_time < day(2), "decided as of the last stored message, not the clock"


async def test_outage_guard_holds_mass_release_until_confirmed(
    services: Services, settings: Settings
) -> None:
    fleet = [SimulatedDevice("big", f"dev-{n:03d}", None, "business") for n in range(20)]
    total = await send(services, settings, [(d, "install", day(0)) for d in fleet])
    total += await send(services, settings, [(d, "heartbeat", day(25)) for d in fleet[:5]])
    await ingest(services, settings, day(25), total)

    guarded = settings.model_copy(update={"guard_min_releases": 5})
    held = await sweep(guarded, day(31))
    assert held.released == 0
    assert held.held_customers == ["big"]
    dry = await sweep(guarded, day(31), dry_run=True)
    assert dry.released == 0
    assert dry.held_customers == ["big"]

    repository = await Repository.connect(settings.database_url.get_secret_value(), 1)
    try:
        assert await repository.fetch("confirm_hold", "big", day(31), None)
    finally:
        await repository.close()
    confirmed = await sweep(guarded, day(31) + timedelta(hours=1))
    assert confirmed.applied_holds == ["big"]
    assert confirmed.released == 15

"""Tenant isolation: an event of customer A never reads or changes customer B's users,
devices, licenses or license events, however their ids collide.

The customers share device and user ids; one customer id is a prefix of another; one holds
`:` so that its Kafka keys (`customer_id:device_id`) equal another customer's; one holds the
separator of the deterministic license event id. (Usage reports do not exist yet: when they
do, they need the same test.)"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import pytest

from tests.integration.license_support import (
    billing_view,
    day,
    ingest,
    publish_outbox,
    send,
    sweep,
)
from tests.support import Services, fetch, make_settings
from worker.settings import Settings
from worker.sim.fleet import SimulatedDevice

pytestmark = pytest.mark.integration

A = "acme"
B = "acme:dev-1"  # A is its prefix; B's device `x` has A's device `dev-1:x` Kafka key
C = "acm"  # a prefix of A
ALICE = "alice@shared.example"
BOB = "bob@shared.example"
TABLES = ["customers", "users", "devices", "device_lifecycle_events", "licenses"]
TABLES += ["license_history", "license_outbox"]


@pytest.fixture
def settings(services: Services, database_url: str, topics: dict[str, str]) -> Settings:
    return make_settings(
        services, database_url, topics, sweep_enabled=False, relay_poll_seconds=0.1
    )


def fleet(customer: str) -> list[SimulatedDevice]:
    return [
        SimulatedDevice(customer, "dev-1", ALICE, "business"),
        SimulatedDevice(customer, "dev-2", ALICE, "personal"),
        SimulatedDevice(customer, "kiosk-1", None, "business"),
    ]


async def rows_of(settings: Settings, customer: str) -> dict[str, list[str]]:
    """Every row of the customer, as text, in every table that has a customer."""
    url = settings.database_url.get_secret_value()
    return {
        table: [
            row["line"]
            for row in await fetch(
                url,
                f"SELECT t::text AS line FROM {table} AS t WHERE customer_id = $1 ORDER BY 1",
                customer,
            )
        ]
        for table in TABLES
    }


async def licenses(settings: Settings, customer: str) -> dict[tuple[str, str], tuple[bool, str]]:
    rows = await fetch(
        settings.database_url.get_secret_value(),
        "SELECT subject_type, subject_id, active, basis FROM licenses WHERE customer_id = $1",
        customer,
    )
    return {(r["subject_type"], r["subject_id"]): (r["active"], r["basis"]) for r in rows}


async def test_events_of_one_customer_never_touch_another_with_the_same_ids(
    services: Services, settings: Settings
) -> None:
    url = settings.database_url.get_secret_value()
    await fetch(url, "INSERT INTO customers (customer_id, license_model) VALUES ($1, 'device')", B)
    colliding_key = SimulatedDevice(A, "dev-1:kiosk-1", None, "business")
    assert colliding_key.key == SimulatedDevice(B, "kiosk-1", None, "business").key
    devices = [*fleet(A), colliding_key, *fleet(B), *fleet(C)]
    total = await send(services, settings, [(d, "install", day(0)) for d in devices])
    await ingest(services, settings, day(0) + timedelta(minutes=5), total)

    user_model = {("user", ALICE): (True, "user"), ("device", "kiosk-1"): (True, "unassigned")}
    assert await licenses(settings, A) == {
        **user_model,
        ("device", "dev-1:kiosk-1"): (True, "unassigned"),
    }
    assert await licenses(settings, B) == {
        ("device", d): (True, "device_model") for d in ("dev-1", "dev-2", "kiosk-1")
    }
    assert await licenses(settings, C) == user_model

    # A moves alice's phone to bob and uninstalls alice's laptop and its kiosk.
    # The worker stops once its offsets are committed, maybe before its relay published
    # every outbox row: publish them now, or the next worker's relay would set their
    # `published_at` and the rows would differ for a reason that is not A's events.
    await publish_outbox(settings)
    others_before = {c: await rows_of(settings, c) for c in (B, C)}
    moved = SimulatedDevice(A, "dev-2", BOB, "personal")
    total += await send(
        services,
        settings,
        [
            (moved, "heartbeat", day(1)),
            (fleet(A)[0], "uninstall", day(1)),
            (fleet(A)[2], "uninstall", day(1)),
            (colliding_key, "heartbeat", day(1)),
        ],
    )
    await ingest(services, settings, day(1) + timedelta(minutes=5), total)
    assert await licenses(settings, A) == {
        ("user", ALICE): (False, "user"),
        ("user", BOB): (True, "user"),
        ("device", "kiosk-1"): (False, "unassigned"),
        ("device", "dev-1:kiosk-1"): (True, "unassigned"),
    }
    assert {c: await rows_of(settings, c) for c in (B, C)} == others_before

    # B and C stay active; A falls silent. At day 92 A's alice (released on day 1) is purged.
    total += await send(services, settings, [(d, "heartbeat", day(25)) for d in fleet(B)])
    total += await send(services, settings, [(d, "heartbeat", day(25)) for d in fleet(C)])
    await ingest(services, settings, day(25), total)
    report = await sweep(settings, day(92))
    assert report.purged == 1
    a_rows = await rows_of(settings, A)
    assert not [row for rows in a_rows.values() for row in rows if "alice" in row]
    for customer in (B, C):
        [user] = await fetch(
            url, "SELECT email FROM users WHERE customer_id = $1 AND user_id = $2", customer, ALICE
        )
        assert user["email"] == ALICE, f"{customer}'s alice lost her data with A's alice"
    c_licenses = await licenses(settings, C)
    assert c_licenses[("user", ALICE)] == (False, "user"), "released on day 55, not purged"
    [c_purged] = await fetch(
        url,
        "SELECT purged_at FROM licenses WHERE customer_id = $1 AND subject_id = $2",
        C,
        ALICE,
    )
    assert c_purged["purged_at"] is None

    await publish_outbox(settings)
    events = await billing_view(services, settings, 100)
    by_customer = Counter(e["customer_id"] for e in events if e["type"].startswith("license."))
    assert by_customer[B] == 6, "B: three devices allocated, then released on day 55"
    snapshots = {e["customer_id"]: e for e in events if e["type"] == "usage.snapshot"}
    assert {c: s["total_licenses"] for c, s in snapshots.items()} == {A: 0, B: 0, C: 0}
    purges = [e for e in events if e["type"] == "user.purged"]
    assert [e["customer_id"] for e in purges] == [A]


async def test_ids_that_spell_each_others_event_id_input_get_distinct_events(
    services: Services, settings: Settings
) -> None:
    """A license event id is a hash of customer, type, subject and time: joined with a
    separator an id may contain, two customers' decisions could hash alike, and the outbox
    (unique event ids) would drop one of them: billing would miss a license."""
    first = SimulatedDevice("acme", "dev-1", "x|license.allocated|user|bob", "business")
    second = SimulatedDevice("acme|license.allocated|user|x", "dev-1", "bob", "business")
    total = await send(services, settings, [(d, "install", day(0)) for d in (first, second)])
    await ingest(services, settings, day(0), total)
    await publish_outbox(settings)
    events = await billing_view(services, settings, 2)
    assert sorted((e["customer_id"], e["subject_id"]) for e in events) == [
        ("acme", "x|license.allocated|user|bob"),
        ("acme|license.allocated|user|x", "bob"),
    ]

"""What a batch of new devices costs the database: the statements (round trips) of the write
path are pinned, so a regression shows, and the shortcut that makes it cheap (a subject this
transaction created holds no license: nothing of it is locked again or read) decides exactly
what the general path decides."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from schemas import AGENT_EVENT_ADAPTER
from scripts.bench.first_sightings import StatementLog, statements_of
from tests.support import Services, fetch, make_settings
from worker.db.session import Session
from worker.ingest.coalesce import AgentEventModel, coalesce
from worker.ingest.loop import write_and_decide
from worker.licensing.decisions import decide_groups, groups_of_devices
from worker.settings import Settings
from worker.sim.fleet import agent_event, build_fleet

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC).replace(microsecond=0)
TOLERANCE = timedelta(minutes=5)

# A batch of new devices, whatever its size: the signal writes (customers, their share lock,
# the user lock, users, the lock of devices without a user, devices), the decisions (the
# customers' terms and subscriptions; nothing of the new users and devices is locked again or
# read), the licenses, and history with outbox in one statement.
FIRST_SIGHTING_STATEMENTS = [
    "BEGIN;",
    "upsert_customers",
    "share_customers",
    "insert_new_users",
    "lock_device_users",
    "lock_devices_without_user",
    "upsert_devices",
    "customer_terms",
    "live_subscriptions",
    "allocate_licenses",
    "append_license_history",
    "COMMIT;",
]


@pytest.fixture
def settings(services: Services, database_url: str) -> Settings:
    return make_settings(services, database_url, {})


def first_sightings(customer: str, devices: int, at: datetime) -> list[AgentEventModel]:
    """One heartbeat, kind given, of each of `devices` new devices of `customer` (the bench's
    first_sighting shape: three devices a user, every tenth without one)."""
    events = []
    for device in build_fleet(1, devices):
        event = agent_event(device, "heartbeat", at) | {
            "customer_id": customer,
            "device_kind": device.kind,
        }
        if device.user_id is not None:
            event["user_id"] = device.user_id.replace(device.customer_id, customer)
        events.append(AGENT_EVENT_ADAPTER.validate_python(event))
    return events


async def write(
    connection: asyncpg.Connection,
    settings: Settings,
    events: list[AgentEventModel],
    *,
    general: bool = False,
) -> StatementLog:
    """One batch in one transaction, as the ingestion loop writes it; `general`: decided
    without what the writes created (the path of the sweeper and the console)."""
    changes = coalesce(events, NOW, TOLERANCE)
    with statements_of(connection) as log:
        async with connection.transaction():
            session = Session(connection)
            if not general:
                await write_and_decide(session, changes, [], settings, NOW)
                return log
            result = await session.write_signals(changes, [], NOW - settings.release_window)
            groups = groups_of_devices(
                (d.customer_id, d.device_id, d.user_id, d.previous_user_id)
                for d in result.license_relevant
            )
            await decide_groups(
                session,
                groups,
                NOW,
                NOW,
                settings.release_window,
                settle=settings.allocation_settle,
                event_key=settings.event_id_key(),
            )
    return log


@pytest.mark.parametrize("devices", [30, 300])
async def test_a_batch_of_new_devices_runs_a_fixed_set_of_statements(
    database_url: str, settings: Settings, devices: int
) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        await write(connection, settings, first_sightings("warm-up", 3, NOW))  # type introspection
        log = await write(connection, settings, first_sightings("acme", devices, NOW))
    finally:
        await connection.close()
    assert log.names == FIRST_SIGHTING_STATEMENTS
    licensed = await fetch(
        database_url, "SELECT subject_type, count(*) AS n FROM licenses GROUP BY 1"
    )
    events = await fetch(database_url, "SELECT count(*) AS n FROM license_outbox")
    history = await fetch(database_url, "SELECT count(*) AS n FROM license_history")
    total = sum(row["n"] for row in licensed)
    assert total > 0
    assert events[0]["n"] == history[0]["n"] == total


async def license_state(database_url: str, customer: str) -> dict[str, Any]:
    """A customer's licenses, history and outbox, without what names the customer."""
    licenses = await fetch(
        database_url,
        "SELECT subject_type, replace(subject_id, $1, '') AS subject, active, basis, package, "
        "event_sequence, allocated_at, released_at FROM licenses WHERE customer_id = $1 "
        "ORDER BY 1, 2",
        customer,
    )
    history = await fetch(
        database_url,
        "SELECT subject_type, replace(subject_id, $1, '') AS subject, change, basis, reason, "
        "effective_at, package FROM license_history WHERE customer_id = $1",
        customer,
    )
    outbox = await fetch(
        database_url,
        "SELECT payload->>'type' AS type, payload->>'subject_type' AS subject_type, "
        "replace(payload->>'subject_id', $1, '') AS subject, payload->>'sequence' AS sequence "
        "FROM license_outbox WHERE customer_id = $1",
        customer,
    )
    return {
        "licenses": [tuple(row) for row in licenses],
        "history": Counter(tuple(row) for row in history),
        "outbox": Counter(tuple(row) for row in outbox),
    }


def moved_and_new(customer: str) -> list[AgentEventModel]:
    """A second batch over a stored fleet: devices moved to users never seen before (a
    device with a user, and one without), new devices joining stored users, and new ones."""
    base = first_sightings(customer, 30, NOW)
    later = NOW + timedelta(minutes=10)
    events = []
    for number, user in [(0, "newcomer"), (9, "newcomer"), (1, "other-new"), (19, None)]:
        document = base[number].model_dump(mode="json") | {
            "event_id": str(uuid.uuid4()),
            "occurred_at": later.isoformat(),
            "user_id": None if user is None else f"{user}@{customer}.example",
        }
        events.append(AGENT_EVENT_ADAPTER.validate_python(document))
    for number in range(30, 40):
        document = base[number % 30].model_dump(mode="json") | {
            "event_id": str(uuid.uuid4()),
            "device_id": f"dev-new-{number}",
            "occurred_at": later.isoformat(),
        }
        events.append(AGENT_EVENT_ADAPTER.validate_python(document))
    return events


async def test_new_subjects_are_decided_as_the_general_path_decides_them(
    database_url: str, settings: Settings
) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        for customer, general in [("fast", False), ("general", True)]:
            await write(connection, settings, first_sightings(customer, 30, NOW), general=general)
            await write(connection, settings, moved_and_new(customer), general=general)
    finally:
        await connection.close()
    fast = await license_state(database_url, "fast")
    general = await license_state(database_url, "general")
    assert fast["licenses"]
    assert any(row[1].startswith("newcomer") for row in fast["licenses"])
    assert fast == general


async def test_a_device_another_transaction_created_meanwhile_is_not_new_to_this_one(
    database_url: str, settings: Settings
) -> None:
    """Two replicas write the same new device without a user: the second waits for the
    first's insert, then updates a row its statement's snapshot did not see. It did not
    create the device (the first did, and licensed it): its decision reads the license."""
    events = first_sightings("acme", 20, NOW)
    lone = [event for event in events if event.user_id is None]
    assert len(lone) == 2
    first, second = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    try:
        await write(first, settings, [lone[0]])  # the customer exists before both
        transaction = first.transaction()
        await transaction.start()
        await write_and_decide(
            Session(first), coalesce([lone[1]], NOW, TOLERANCE), [], settings, NOW
        )
        later = lone[1].model_dump(mode="json") | {
            "event_id": str(uuid.uuid4()),
            "occurred_at": (NOW + timedelta(minutes=1)).isoformat(),
        }
        waiting = asyncio.create_task(
            write(second, settings, [AGENT_EVENT_ADAPTER.validate_python(later)])
        )
        await asyncio.sleep(1)
        assert not waiting.done()  # on the first one's insert of the device
        await transaction.commit()
        log = await asyncio.wait_for(waiting, 30)
    finally:
        await first.close()
        await second.close()
    assert "held_licenses" in log.names
    licenses = await fetch(
        database_url,
        "SELECT event_sequence, active FROM licenses WHERE subject_id = $1",
        lone[1].device_id,
    )
    assert [tuple(row) for row in licenses] == [(1, True)]
    events_of_device = await fetch(
        database_url,
        "SELECT payload->>'type' AS type FROM license_outbox WHERE subject_id = $1",
        lone[1].device_id,
    )
    assert [row["type"] for row in events_of_device] == ["license.allocated"]

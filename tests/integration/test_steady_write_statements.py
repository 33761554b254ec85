"""What the steady state costs the database (issue #17): a batch whose heartbeats the last-seen
precision keeps back runs no write statement, and the heartbeats it lets through, plain
last-seen moves of remembered devices, are written by `refresh_devices` (one UPDATE) instead
of the device upsert with its before-image, with exactly the stored result of the upsert."""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from schemas import AGENT_EVENT_ADAPTER
from scripts.bench.first_sightings import StatementLog, statements_of
from tests.support import Services, fetch, make_settings
from worker.db.session import Session
from worker.ingest.batch import PartitionProgress
from worker.ingest.coalesce import AgentEventModel, coalesce
from worker.ingest.last_seen_memory import LastSeenMemory, Remembered, keep_back_unchanged
from worker.ingest.loop import write_and_decide
from worker.settings import Settings
from worker.sim.fleet import agent_event, build_fleet

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC).replace(microsecond=0)
TOLERANCE = timedelta(minutes=5)
PRECISION = timedelta(minutes=15)
DeviceKey = tuple[str, str]

# Heartbeats of remembered devices that only move their last seen past the precision: the
# signal writes' locks as for any batch, the users' last seen, and one UPDATE of the devices.
REFRESH_STATEMENTS = [
    "BEGIN;",
    "upsert_customers",
    "share_customers",
    "lock_device_users",
    "upsert_users",
    "lock_devices_without_user",
    "refresh_devices",
    "COMMIT;",
]


@pytest.fixture
def settings(services: Services, database_url: str) -> Settings:
    return make_settings(services, database_url, {})


def fleet_events(customer: str, event_type: str, at: datetime, **fields: Any) -> list[Any]:
    """One event of each of 30 devices of `customer` (three devices a user, every tenth
    without one), as the benchmark's fleet."""
    events = []
    for device in build_fleet(1, 30):
        event = agent_event(device, event_type, at) | {"customer_id": customer, **fields}
        if device.user_id is not None:
            event["user_id"] = device.user_id.replace(device.customer_id, customer)
        events.append(AGENT_EVENT_ADAPTER.validate_python(event))
    return events


def changed(event: AgentEventModel, **fields: Any) -> AgentEventModel:
    document = event.model_dump(mode="json") | {"event_id": str(uuid.uuid4()), **fields}
    return AGENT_EVENT_ADAPTER.validate_python(document)


async def write(
    connection: asyncpg.Connection,
    settings: Settings,
    events: list[AgentEventModel],
    at: datetime,
    memory: LastSeenMemory | None = None,
    progress: Collection[PartitionProgress] = (),
) -> StatementLog:
    """One batch as the ingestion loop writes it: with a memory, what it keeps back is not
    written and the devices it remembers are offered to `refresh_devices`; every device
    written is remembered."""
    changes = coalesce(events, at, TOLERANCE)
    refresh: set[DeviceKey] = set()
    if memory is not None:
        keep_back_unchanged(changes, memory, PRECISION, refresh)
    with statements_of(connection) as log:
        async with connection.transaction():
            result, _ = await write_and_decide(
                Session(connection),
                changes,
                list(progress),
                settings,
                at,
                remember=memory is not None,
                refresh=refresh,
            )
    if memory is not None:
        for device in result.written:
            memory.remember(
                (device.customer_id, device.device_id),
                Remembered(
                    device.last_seen_at,
                    device.user_id,
                    device.device_kind,
                    device.agent_version,
                    device.protected,
                ),
                memory.generation,
            )
    return log


async def test_heartbeats_past_the_precision_of_remembered_devices_are_one_update(
    database_url: str, settings: Settings
) -> None:
    memory = LastSeenMemory(1_000)
    connection = await asyncpg.connect(database_url)
    try:
        await write(connection, settings, fleet_events("acme", "install", NOW), NOW, memory)
        later = NOW + PRECISION
        log = await write(
            connection, settings, fleet_events("acme", "heartbeat", later), later, memory
        )
    finally:
        await connection.close()
    assert log.names == REFRESH_STATEMENTS
    devices = await fetch(database_url, "SELECT DISTINCT last_seen_at FROM devices")
    users = await fetch(database_url, "SELECT DISTINCT last_seen_at FROM users")
    assert [row["last_seen_at"] for row in devices] == [later]
    assert [row["last_seen_at"] for row in users] == [later]


async def test_a_batch_the_precision_keeps_back_writes_only_its_progress(
    database_url: str, settings: Settings
) -> None:
    memory = LastSeenMemory(1_000)
    progress = PartitionProgress("agent.heartbeat.v1", 0, 42, NOW)
    connection = await asyncpg.connect(database_url)
    try:
        installs = fleet_events("acme", "install", NOW)
        await write(connection, settings, installs, NOW, memory, [progress])  # warm-up
        later = NOW + timedelta(minutes=5)
        events = fleet_events("acme", "heartbeat", later)
        log = await write(connection, settings, events, later, memory, [progress])
    finally:
        await connection.close()
    assert log.names == ["BEGIN;", "record_ingestion_progress", "COMMIT;"]


def steady_batches(customer: str) -> list[tuple[datetime, list[AgentEventModel]]]:
    """Installs, then heartbeat rounds 5 minutes apart, with changes the refresh must leave
    to the device upsert: a device moved to another user, one explicitly unassigned, a kind
    change, an agent upgrade, an uninstall followed by a heartbeat (a reinstall), and a
    device silent past the license window, heard from again (its license is re-decided)."""
    batches = [(NOW, fleet_events(customer, "install", NOW))]
    for round_number in range(1, 7):  # the last (30 minutes) is written by the refresh
        at = NOW + timedelta(minutes=5 * round_number)
        events = fleet_events(customer, "heartbeat", at)
        if round_number == 3:
            events[0] = changed(events[0], user_id=f"someone-else@{customer}.example")
            events[1] = changed(events[1], user_id=None)
            events[2] = changed(events[2], device_kind="personal")
            events[4] = changed(events[4], agent_version="9.9.9")
            events.append(changed(events[5], type="uninstall", occurred_at=at.isoformat()))
            del events[5]
        batches.append((at, events))
    return batches


async def stored_state(database_url: str, customer: str) -> dict[str, Any]:
    """The customer's devices, users, device history and licenses, without what names it."""

    async def rows(sql: str) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in await fetch(database_url, sql, customer)]

    return {
        "devices": await rows(
            "SELECT device_id, replace(user_id, $1, ''), user_reported_at, device_kind, "
            "kind_reported_at, agent_version, agent_version_reported_at, hostname, os, "
            "first_seen_at, last_seen_at, last_present_at, last_installed_at, "
            "last_uninstalled_at, protected FROM devices WHERE customer_id = $1 ORDER BY 1"
        ),
        "users": await rows(
            "SELECT replace(user_id, $1, ''), first_seen_at, last_seen_at FROM users "
            "WHERE customer_id = $1 ORDER BY 1"
        ),
        "history": await rows(
            "SELECT device_id, replace(user_id, $1, ''), device_kind, protected, seen_at "
            "FROM device_history WHERE customer_id = $1 ORDER BY 1, 5, 2, 3, 4"
        ),
        "licenses": await rows(
            "SELECT subject_type, replace(subject_id, $1, ''), active, basis, event_sequence "
            "FROM licenses WHERE customer_id = $1 ORDER BY 1, 2"
        ),
    }


async def test_refreshed_devices_are_stored_as_the_upsert_stores_them(
    database_url: str, settings: Settings
) -> None:
    """The same signals, once through the precision and the refresh, once with every event
    written by the general path: the same stored state once what was kept back is written
    (as a replica does before it loses its devices)."""
    connection = await asyncpg.connect(database_url)
    try:
        memory = LastSeenMemory(1_000)
        refreshed = []
        for at, events in steady_batches("steady"):
            log = await write(connection, settings, events, at, memory)
            refreshed.append("refresh_devices" in log.names)
        kept_back = memory.take_kept_back()
        async with connection.transaction():
            await write_and_decide(Session(connection), kept_back, [], settings, NOW)
        for at, events in steady_batches("general"):
            await write(connection, settings, events, at)
    finally:
        await connection.close()
    assert refreshed[-1]
    steady = await stored_state(database_url, "steady")
    general = await stored_state(database_url, "general")
    assert steady["devices"]
    assert steady == general


async def test_a_device_silent_past_the_window_is_not_refreshed_and_gets_its_license_back(
    database_url: str, settings: Settings
) -> None:
    """The memory believes the device was seen recently, but the stored row (another path
    wrote it back) is silent past the window: the refresh leaves it to the upsert, which
    re-decides its license."""
    memory = LastSeenMemory(1_000)
    long_ago = NOW - timedelta(days=45)
    connection = await asyncpg.connect(database_url)
    try:
        await write(connection, settings, fleet_events("acme", "install", long_ago), long_ago)
        await connection.execute(
            "UPDATE licenses SET active = false, released_at = $1", NOW - timedelta(days=14)
        )
        heartbeats = [e for e in fleet_events("acme", "heartbeat", NOW) if e.user_id is None]
        for event in heartbeats:
            remembered = Remembered(
                NOW - timedelta(minutes=20), None, event.device_kind, event.agent_version, True
            )
            memory.remember(("acme", event.device_id), remembered, memory.generation)
        log = await write(connection, settings, heartbeats, NOW, memory)
    finally:
        await connection.close()
    assert "refresh_devices" in log.names
    assert "upsert_devices" in log.names
    licensed = await fetch(
        database_url, "SELECT count(*) AS n FROM licenses WHERE subject_type = 'device' AND active"
    )
    assert licensed[0]["n"] == 3

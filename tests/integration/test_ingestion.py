"""Agent events through the real broker into the real database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from tests.support import (
    POISON_TRIGGER,
    Services,
    committed_offsets_total,
    encode,
    fetch,
    fetchval,
    make_settings,
    produce,
    read_all,
    running_worker,
    wait_until,
)
from worker.clock import FixedClock
from worker.ingest import loop as ingest
from worker.ingest.coalesce import BatchChanges
from worker.sim.fleet import SimulatedDevice, agent_event, build_fleet

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def key(customer_id: str, device_id: str) -> bytes:
    return f"{customer_id}:{device_id}".encode()


def heartbeat(customer_id: str, device_id: str, at: datetime, **fields: Any) -> dict[str, Any]:
    device = SimulatedDevice(customer_id, device_id, fields.pop("user_id", None), "business")
    event = agent_event(device, "heartbeat", at)
    if "omit_user" in fields:
        fields.pop("omit_user")
        event.pop("user_id")
    return {**event, **fields}


def lifecycle(
    customer_id: str, device_id: str, kind: str, at: datetime, **fields: Any
) -> dict[str, Any]:
    device = SimulatedDevice(customer_id, device_id, fields.pop("user_id", None), "personal")
    return {**agent_event(device, kind, at), **fields}


async def produce_events(services: Services, topic: str, events: list[dict[str, Any]]) -> None:
    await produce(
        services.kafka_bootstrap_servers,
        topic,
        [(key(e["customer_id"], e["device_id"]), encode(e)) for e in events],
    )


async def wait_for_commits(services: Services, topics: dict[str, str], expected: int) -> None:
    names = [topics["heartbeat_topic"], topics["lifecycle_topic"]]

    async def all_committed() -> bool:
        total = await committed_offsets_total(
            services.kafka_bootstrap_servers, topics["consumer_group"], names
        )
        return total >= expected

    await wait_until(all_committed, timeout=60)


async def test_fleet_events_become_rows(
    services: Services, database_url: str, topics: dict[str, str]
) -> None:
    fleet = build_fleet(customers=2, devices_per_customer=12)
    installs = [agent_event(device, "install", T0) for device in fleet]
    heartbeats = [
        agent_event(device, "heartbeat", T0 + timedelta(minutes=5 * n))
        for n in range(1, 4)
        for device in fleet
    ]
    await produce_events(services, topics["lifecycle_topic"], installs)
    await produce_events(services, topics["heartbeat_topic"], heartbeats)
    settings = make_settings(services, database_url, topics)

    async with running_worker(settings):
        await wait_for_commits(services, topics, len(installs) + len(heartbeats))

    devices = await fetch(database_url, "SELECT * FROM devices ORDER BY customer_id, device_id")
    assert len(devices) == len(fleet)
    assert {row["last_seen_at"] for row in devices} == {T0 + timedelta(minutes=15)}
    assert all(row["protected"] for row in devices)
    assert {
        (row["customer_id"], row["device_id"], row["user_id"], row["device_kind"])
        for row in devices
    } == {(d.customer_id, d.device_id, d.user_id, d.kind) for d in fleet}
    users = await fetch(database_url, "SELECT * FROM users")
    assert len(users) == len({(d.customer_id, d.user_id) for d in fleet if d.user_id})
    assert all(row["email"] == row["user_id"] for row in users)
    assert await fetchval(database_url, "SELECT count(*) FROM device_lifecycle_events") == len(
        fleet
    )
    assert await fetchval(database_url, "SELECT sum(next_offset) FROM ingestion_progress") == len(
        installs
    ) + len(heartbeats)


async def test_duplicates_and_late_events_leave_state_correct(
    services: Services, database_url: str, topics: dict[str, str]
) -> None:
    install = lifecycle("c1", "d1", "install", T0, user_id="alice")
    uninstall = lifecycle("c1", "d1", "uninstall", T0 + timedelta(days=2))
    events_heartbeat = [
        heartbeat("c1", "d1", T0 + timedelta(days=1), user_id="alice"),
        heartbeat("c1", "d1", T0 + timedelta(hours=3), user_id="alice"),  # late
        heartbeat("c1", "d1", T0 + timedelta(days=1), user_id="alice"),  # duplicate
    ]
    # Uninstall first on the wire, install afterwards: event time decides, not arrival.
    await produce_events(services, topics["lifecycle_topic"], [uninstall, install, uninstall])
    await produce_events(services, topics["heartbeat_topic"], events_heartbeat)
    settings = make_settings(services, database_url, topics)

    async with running_worker(settings):
        await wait_for_commits(services, topics, 6)
        [device] = await fetch(database_url, "SELECT * FROM devices")
        assert device["last_seen_at"] == T0 + timedelta(days=2)
        assert device["last_uninstalled_at"] == T0 + timedelta(days=2)
        assert device["protected"] is False, "a heartbeat older than the uninstall never undoes it"
        assert await fetchval(database_url, "SELECT count(*) FROM device_lifecycle_events") == 2

        # A heartbeat after the uninstall means the agent was reinstalled.
        await produce_events(
            services,
            topics["heartbeat_topic"],
            [heartbeat("c1", "d1", T0 + timedelta(days=3), user_id="alice")],
        )
        await wait_for_commits(services, topics, 7)

    [device] = await fetch(database_url, "SELECT * FROM devices")
    assert device["protected"] is True
    assert device["last_seen_at"] == T0 + timedelta(days=3)
    [user] = await fetch(database_url, "SELECT * FROM users")
    assert user["last_seen_at"] == T0 + timedelta(days=3)
    assert user["first_seen_at"] == T0


async def test_same_device_id_under_two_customers_stays_apart(
    services: Services, database_url: str, topics: dict[str, str]
) -> None:
    events = [
        heartbeat("cust-a", "shared-device", T0 + timedelta(hours=1), user_id="same-user"),
        heartbeat("cust-b", "shared-device", T0 + timedelta(hours=2), user_id="same-user"),
    ]
    uninstall_a = lifecycle("cust-a", "shared-device", "uninstall", T0 + timedelta(hours=3))
    await produce_events(services, topics["heartbeat_topic"], events)
    await produce_events(services, topics["lifecycle_topic"], [uninstall_a])
    settings = make_settings(services, database_url, topics)

    async with running_worker(settings):
        await wait_for_commits(services, topics, 3)

    rows = await fetch(
        database_url,
        "SELECT customer_id, last_seen_at, protected FROM devices ORDER BY customer_id",
    )
    assert [tuple(row) for row in rows] == [
        ("cust-a", T0 + timedelta(hours=3), False),
        ("cust-b", T0 + timedelta(hours=2), True),
    ]
    users = await fetch(
        database_url, "SELECT customer_id, last_seen_at FROM users ORDER BY customer_id"
    )
    assert [tuple(row) for row in users] == [
        ("cust-a", T0 + timedelta(hours=3)),
        ("cust-b", T0 + timedelta(hours=2)),
    ]


async def test_heartbeat_moves_device_to_its_new_user_and_future_times_are_clamped(
    services: Services, database_url: str, topics: dict[str, str]
) -> None:
    now = T0 + timedelta(days=1)
    events = [
        heartbeat("c1", "laptop", T0, user_id="alice"),
        heartbeat("c1", "laptop", T0 + timedelta(hours=1), user_id="bob"),
        heartbeat("c1", "laptop", T0 + timedelta(minutes=30), user_id="carol"),  # late: no move
        heartbeat("c1", "phone", now + timedelta(days=365), user_id="dave"),  # agent clock ahead
    ]
    await produce_events(services, topics["heartbeat_topic"], events)
    settings = make_settings(services, database_url, topics, future_tolerance_seconds=60)

    async with running_worker(settings, clock=FixedClock(now)):
        await wait_for_commits(services, topics, 4)

    devices = {row["device_id"]: row for row in await fetch(database_url, "SELECT * FROM devices")}
    assert devices["laptop"]["user_id"] == "bob"
    assert devices["phone"]["last_seen_at"] == now + timedelta(seconds=60)


BAD_INPUTS: list[tuple[str, bytes | None]] = [
    ("invalid_json", b"{not json"),
    ("invalid_utf8", b'{"type": "heartbeat", "device_id": "\xff\xfe"}'),
    ("not_an_object", b"[1, 2, 3]"),
    ("unknown_type", encode({**heartbeat("c1", "d1", T0), "type": "reboot"})),
    ("unsupported_schema_version", encode({**heartbeat("c1", "d1", T0), "schema_version": 2})),
    ("schema_violation", encode({**heartbeat("c1", "d1", T0), "device_id": ""})),
    ("schema_violation", encode({**heartbeat("c1", "d1", T0), "customer_id": "x" * 5000})),
    (
        "schema_violation",
        encode({**heartbeat("c1", "d1", T0), "occurred_at": "2026-11-01T00:00:00"}),
    ),
    ("oversized", encode({**heartbeat("c1", "d1", T0), "padding": "x" * 70_000})),
    ("empty", None),
]


async def test_bad_input_goes_to_the_dlq_unchanged_and_good_messages_around_it_are_stored(
    services: Services, database_url: str, topics: dict[str, str]
) -> None:
    good_before = heartbeat("c1", "good-1", T0, user_id="alice")
    good_after = heartbeat("c1", "good-2", T0, user_id="alice")
    messages: list[tuple[bytes | None, bytes | None]] = [(b"c1:good-1", encode(good_before))]
    messages += [(f"bad-{n}".encode(), value) for n, (_, value) in enumerate(BAD_INPUTS)]
    messages.append((b"c1:good-2", encode(good_after)))
    # One partition keeps the good messages on both sides of the bad ones.
    topic = topics["heartbeat_topic"]
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=services.kafka_bootstrap_servers, max_request_size=1_000_000
    )
    await producer.start()
    try:
        for message_key, value in messages:
            await producer.send_and_wait(topic, value=value, key=message_key, partition=0)
    finally:
        await producer.stop()
    settings = make_settings(services, database_url, topics)

    async with running_worker(settings):
        await wait_for_commits(services, topics, len(messages))

    assert {
        row["device_id"] for row in await fetch(database_url, "SELECT device_id FROM devices")
    } == {
        "good-1",
        "good-2",
    }
    dead = await read_all(services.kafka_bootstrap_servers, topics["dlq_topic"], len(BAD_INPUTS))
    assert len(dead) == len(BAD_INPUTS)
    by_key = {record.key: record for record in dead}
    for n, (reason, value) in enumerate(BAD_INPUTS):
        record = by_key[f"bad-{n}".encode()]
        headers = {name: header_value.decode() for name, header_value in record.headers}
        assert record.value == value, "the DLQ keeps the bytes unchanged"
        assert headers["dlq.error.class"] == reason
        assert headers["dlq.error.message"]
        assert headers["dlq.source.topic"] == topic
        assert headers["dlq.source.partition"] == "0"
        assert int(headers["dlq.source.offset"]) == n + 1
        assert datetime.fromisoformat(headers["dlq.failed_at"])


async def test_a_message_the_database_refuses_goes_to_the_dlq_and_the_rest_is_stored(
    services: Services, database_url: str, topics: dict[str, str]
) -> None:
    connection = await asyncpg.connect(services.owner_url(database_url))
    try:
        await connection.execute(POISON_TRIGGER)
    finally:
        await connection.close()
    events = [heartbeat("c1", name, T0, user_id="alice") for name in ("good-1", "poison", "good-2")]
    await produce_events(services, topics["heartbeat_topic"], events)
    settings = make_settings(services, database_url, topics)

    async with running_worker(settings):
        await wait_for_commits(services, topics, 3)

    stored = {
        row["device_id"] for row in await fetch(database_url, "SELECT device_id FROM devices")
    }
    assert stored == {"good-1", "good-2"}
    [dead] = await read_all(services.kafka_bootstrap_servers, topics["dlq_topic"], 1)
    headers = {name: value.decode() for name, value in dead.headers}
    assert dead.key == b"c1:poison"
    assert headers["dlq.error.class"] == "database_rejected"
    assert headers["dlq.error.message"] == "InvalidParameterValueError"


async def test_a_refused_message_in_one_customers_part_leaves_the_concurrent_part_stored(
    services: Services, database_url: str, topics: dict[str, str], monkeypatch: Any
) -> None:
    """With WRITE_CONCURRENCY=2 a batch of two customers is written in two transactions
    at once; when one is refused, only that customer's messages are retried one by one."""
    monkeypatch.setattr(ingest, "MIN_DEVICES_PER_PART", 1)  # split even this small batch
    part_counts: list[int] = []
    split = BatchChanges.split_by_customer

    def counting_split(changes: BatchChanges, *arguments: Any) -> list[BatchChanges]:
        parts = split(changes, *arguments)
        part_counts.append(len(parts))
        return parts

    monkeypatch.setattr(BatchChanges, "split_by_customer", counting_split)
    connection = await asyncpg.connect(services.owner_url(database_url))
    try:
        await connection.execute(POISON_TRIGGER)
    finally:
        await connection.close()
    events = [
        heartbeat(customer, name, T0, user_id="alice")
        for customer, name in [("c1", "good-1"), ("c1", "poison"), ("c2", "good-2")]
        + [("c2", f"more-{n}") for n in range(5)]
    ]
    await produce_events(services, topics["heartbeat_topic"], events)
    settings = make_settings(services, database_url, topics, write_concurrency=2)

    async with running_worker(settings):
        await wait_for_commits(services, topics, len(events))

    stored = await fetch(database_url, "SELECT customer_id, device_id FROM devices")
    assert {(row["customer_id"], row["device_id"]) for row in stored} == {
        ("c1", "good-1"),
        ("c2", "good-2"),
        *(("c2", f"more-{n}") for n in range(5)),
    }
    [dead] = await read_all(services.kafka_bootstrap_servers, topics["dlq_topic"], 1)
    assert dead.key == b"c1:poison"
    progress = await fetch(database_url, "SELECT sum(next_offset) AS total FROM ingestion_progress")
    assert progress[0]["total"] == len(events), "progress is recorded after both parts"
    assert 2 in part_counts, "the batch was written in two concurrent parts"

"""Last-seen precision on real Kafka and Postgres: heartbeats that only move a device's last
seen by less than the precision are not written; everything else is, releases are never
early and at most the precision late, a rebalance costs one write per device, and two
replicas store what one does (docs/ingestion.md, "Last-seen precision")."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client import REGISTRY

from tests.integration.license_support import DAY0, sweep
from tests.service_fixtures import fresh_topic_names
from tests.support import (
    Services,
    WorkerProcess,
    committed_offsets_total,
    create_topics,
    encode,
    fetch,
    make_settings,
    produce,
    running_worker,
    wait_until,
)
from worker.clock import FixedClock
from worker.kafka.clients import AGENT_TOPIC_CONFIG
from worker.settings import Settings

PRECISION = timedelta(minutes=15)
WINDOW = timedelta(days=30)
T0 = DAY0
# The workers' clock: after every event of these tests, so none is clamped.
NOW = T0 + timedelta(hours=2)


def minutes(number: float) -> datetime:
    return T0 + timedelta(minutes=number)


def precise_settings(
    services: Services, database_url: str, topics: dict[str, str], **overrides: Any
) -> Settings:
    return make_settings(
        services,
        database_url,
        topics,
        last_seen_precision_seconds=PRECISION.total_seconds(),
        **overrides,
    )


def signal(
    event_type: str, device: str, at: datetime, *, customer: str = "acme", **fields: Any
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "schema_version": 1,
        "event_id": f"{customer}-{device}-{event_type}-{at.isoformat()}",
        "type": event_type,
        "customer_id": customer,
        "device_id": device,
        "occurred_at": at.isoformat().replace("+00:00", "Z"),
        "agent_version": "5.3.1",
        **fields,
    }
    if event_type == "install":
        event.setdefault("device_kind", "business")
        event.setdefault("hostname", f"host-{device}")
        event.setdefault("os", "windows-11")
    return event


def heartbeat(device: str, at: datetime, **fields: Any) -> dict[str, Any]:
    return signal("heartbeat", device, at, **fields)


def install(device: str, at: datetime, **fields: Any) -> dict[str, Any]:
    return signal("install", device, at, **fields)


def uninstall(device: str, at: datetime, **fields: Any) -> dict[str, Any]:
    return signal("uninstall", device, at, **fields)


class Stream:
    """Sends agent events to a test's topics and waits until the group has committed them."""

    def __init__(self, services: Services, settings: Settings) -> None:
        self._services = services
        self._settings = settings
        self.sent = 0

    async def deliver(self, events: Sequence[dict[str, Any]]) -> None:
        by_topic: dict[str, list[tuple[bytes, bytes]]] = {}
        for event in events:
            topic = (
                self._settings.heartbeat_topic
                if event["type"] == "heartbeat"
                else self._settings.lifecycle_topic
            )
            key = f"{event['customer_id']}:{event['device_id']}".encode()
            by_topic.setdefault(topic, []).append((key, encode(event)))
        for topic, messages in by_topic.items():
            await produce(self._services.kafka_bootstrap_servers, topic, messages)
        self.sent += len(events)

        async def committed() -> bool:
            total = await committed_offsets_total(
                self._services.kafka_bootstrap_servers,
                self._settings.consumer_group,
                self._settings.agent_topics,
            )
            return total >= self.sent

        await wait_until(committed, timeout=60)


async def device_row(database_url: str, device: str, customer: str = "acme") -> Any:
    [row] = await fetch(
        database_url,
        "SELECT *, xmin::text AS version FROM devices WHERE customer_id = $1 AND device_id = $2",
        customer,
        device,
    )
    return row


async def user_last_seen(database_url: str, user: str, customer: str = "acme") -> datetime:
    [row] = await fetch(
        database_url,
        "SELECT last_seen_at FROM users WHERE customer_id = $1 AND user_id = $2",
        customer,
        user,
    )
    return row["last_seen_at"]  # type: ignore[no-any-return]


async def license_active(database_url: str, subject_type: str, subject_id: str) -> bool | None:
    rows = await fetch(
        database_url,
        "SELECT active FROM licenses WHERE customer_id = 'acme' AND subject_type = $1 "
        "AND subject_id = $2",
        subject_type,
        subject_id,
    )
    return rows[0]["active"] if rows else None


def skipped_total() -> float:
    return REGISTRY.get_sample_value("license_worker_heartbeats_skipped_total") or 0.0


async def test_heartbeats_within_the_precision_are_not_written_and_the_first_past_it_is(
    services: Services, database_url: str, topics: dict[str, str]
) -> None:
    settings = precise_settings(services, database_url, topics)
    stream = Stream(services, settings)
    async with running_worker(settings, clock=FixedClock(NOW)):
        await stream.deliver([install("laptop", minutes(0), user_id="alice")])
        written = await device_row(database_url, "laptop")
        skipped_before = skipped_total()

        await stream.deliver([heartbeat("laptop", minutes(5), user_id="alice")])
        await stream.deliver([heartbeat("laptop", minutes(14), user_id="alice")])

        row = await device_row(database_url, "laptop")
        assert row["version"] == written["version"]  # the row was not written at all
        assert row["last_seen_at"] == minutes(0)
        assert await user_last_seen(database_url, "alice") == minutes(0)
        assert skipped_total() - skipped_before == 2

        await stream.deliver([heartbeat("laptop", minutes(15), user_id="alice")])

        row = await device_row(database_url, "laptop")
        assert (row["last_seen_at"], row["last_present_at"]) == (minutes(15), minutes(15))
        assert await user_last_seen(database_url, "alice") == minutes(15)


async def test_a_skipped_heartbeat_never_delays_a_release_by_more_than_the_precision(
    services: Services, database_url: str, topics: dict[str, str]
) -> None:
    """The laptop's newest heartbeat (minute 10) is not written: the stored last seen is
    minute 0. Its license is due for release at minute 10 + the window; it is not released
    before, and is released by minute 0 + the window + the precision."""
    # The test's sweeps, not the worker's (its loop would hold the sweeper lock).
    settings = precise_settings(services, database_url, topics, sweep_enabled=False)
    stream = Stream(services, settings)
    async with running_worker(settings, clock=FixedClock(NOW)):
        await stream.deliver([install("kiosk", minutes(0), user_id=None)])
        await stream.deliver([heartbeat("kiosk", minutes(10), user_id=None)])
        assert (await device_row(database_url, "kiosk"))["last_seen_at"] == minutes(0)
        assert await license_active(database_url, "device", "kiosk") is True

        due = minutes(10) + WINDOW
        await sweep(settings, due - timedelta(minutes=1))
        assert await license_active(database_url, "device", "kiosk") is True  # never early

        await sweep(settings, minutes(0) + WINDOW + PRECISION + timedelta(seconds=1))
        assert await license_active(database_url, "device", "kiosk") is False
    [row] = await fetch(
        database_url,
        "SELECT released_at FROM licenses WHERE subject_id = 'kiosk' AND subject_type = 'device'",
    )
    assert due <= row["released_at"] <= due + PRECISION  # at most the precision late


async def test_a_heartbeat_after_an_uninstall_is_a_reinstall_and_is_written(
    services: Services, database_url: str, topics: dict[str, str]
) -> None:
    settings = precise_settings(services, database_url, topics)
    stream = Stream(services, settings)
    async with running_worker(settings, clock=FixedClock(NOW)):
        await stream.deliver([install("kiosk", minutes(0), user_id=None)])
        await stream.deliver([uninstall("kiosk", minutes(1))])
        assert await license_active(database_url, "device", "kiosk") is False

        await stream.deliver([heartbeat("kiosk", minutes(2), user_id=None)])

        row = await device_row(database_url, "kiosk")
        assert row["protected"]
        assert row["last_present_at"] == minutes(2)
        assert await license_active(database_url, "device", "kiosk") is True


async def test_a_late_uninstall_older_than_a_skipped_heartbeat_leaves_the_device_installed(
    services: Services, database_url: str, topics: dict[str, str]
) -> None:
    """The uninstall (minute 2) is processed after a heartbeat of minute 3 that was not
    written: the device was reinstalled by minute 3, as if the heartbeat had been written."""
    settings = precise_settings(services, database_url, topics)
    stream = Stream(services, settings)
    async with running_worker(settings, clock=FixedClock(NOW)):
        await stream.deliver([install("kiosk", minutes(0), user_id=None)])
        await stream.deliver([heartbeat("kiosk", minutes(3), user_id=None)])
        assert (await device_row(database_url, "kiosk"))["last_seen_at"] == minutes(0)

        await stream.deliver([uninstall("kiosk", minutes(2))])

        row = await device_row(database_url, "kiosk")
        assert (row["last_present_at"], row["last_uninstalled_at"]) == (minutes(3), minutes(2))
        assert row["protected"]
        assert await license_active(database_url, "device", "kiosk") is True


async def test_user_kind_and_agent_version_changes_are_never_skipped(
    services: Services, database_url: str, topics: dict[str, str]
) -> None:
    settings = precise_settings(services, database_url, topics)
    stream = Stream(services, settings)
    async with running_worker(settings, clock=FixedClock(NOW)):
        await stream.deliver([install("laptop", minutes(0), user_id="alice")])

        await stream.deliver([heartbeat("laptop", minutes(1), user_id="bob")])
        row = await device_row(database_url, "laptop")
        assert (row["user_id"], row["last_seen_at"]) == ("bob", minutes(1))
        assert await license_active(database_url, "user", "bob") is True
        assert await license_active(database_url, "user", "alice") is False

        await stream.deliver([heartbeat("laptop", minutes(2), device_kind="personal")])
        row = await device_row(database_url, "laptop")
        assert (row["device_kind"], row["last_seen_at"]) == ("personal", minutes(2))

        await stream.deliver([heartbeat("laptop", minutes(3), agent_version="6.0.0")])
        row = await device_row(database_url, "laptop")
        assert (row["agent_version"], row["last_seen_at"]) == ("6.0.0", minutes(3))

        await stream.deliver([heartbeat("laptop", minutes(4), user_id=None)])
        row = await device_row(database_url, "laptop")
        assert (row["user_id"], row["last_seen_at"]) == (None, minutes(4))


ASSIGNMENT_EVENTS = {"ingest.partitions_assigned", "ingest.partitions_revoked"}


def assignment(worker: WorkerProcess, topics: Sequence[str]) -> set[tuple[str, int]]:
    """The worker's agent partitions, as its newest assignment or revocation logged them."""
    owned: set[tuple[str, int]] = set()
    for line in worker.log_text().splitlines():
        with contextlib.suppress(ValueError):
            entry = orjson.loads(line)
            if entry.get("event") not in ASSIGNMENT_EVENTS:
                continue
            named = [name.rsplit("[", 1) for name in entry["partitions"]]
            partitions = {(topic, int(number.rstrip("]"))) for topic, number in named}
            if not {topic for topic, _ in partitions} <= set(topics):
                continue
            owned = partitions if entry["event"] == "ingest.partitions_assigned" else set()
    return owned


async def wait_for_assignments(
    workers: Sequence[WorkerProcess], settings: Settings, partitions: int = 8
) -> None:
    """Until the workers share every partition of the agent topics between them."""

    async def assigned() -> bool:
        owned = [assignment(worker, settings.agent_topics) for worker in workers]
        return all(owned) and len(set().union(*owned)) == sum(map(len, owned)) == partitions

    await wait_until(assigned, timeout=120)


@contextlib.contextmanager
def worker_processes(
    settings: Settings, tmp_path: Path, count: int
) -> Iterator[list[WorkerProcess]]:
    workers = [
        WorkerProcess(settings, tmp_path / f"worker-{uuid.uuid4().hex[:6]}.log").start()
        for _ in range(count)
    ]
    try:
        yield workers
    finally:
        for worker in workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.kill()


DEVICES = [f"device-{number:02d}" for number in range(12)]


async def test_after_a_rebalance_the_new_owner_writes_the_first_heartbeat_of_each_device(
    services: Services, database_url: str, topics: dict[str, str], tmp_path: Path
) -> None:
    settings = precise_settings(services, database_url, topics)
    stream = Stream(services, settings)
    with worker_processes(settings, tmp_path, 2) as (staying, leaving):
        await wait_for_assignments([staying, leaving], settings)
        await stream.deliver([install(d, minutes(0), user_id=f"user-{d}") for d in DEVICES])
        await stream.deliver([heartbeat(d, minutes(5), user_id=f"user-{d}") for d in DEVICES])
        rows = [await device_row(database_url, d) for d in DEVICES]
        assert {row["last_seen_at"] for row in rows} == {minutes(0)}

        assert leaving.terminate() == 0
        await wait_for_assignments([staying], settings)
        # What each replica kept back was written when its partitions were revoked.
        rows = [await device_row(database_url, d) for d in DEVICES]
        assert {row["last_seen_at"] for row in rows} == {minutes(5)}

        await stream.deliver([heartbeat(d, minutes(10), user_id=f"user-{d}") for d in DEVICES])

        rows = [await device_row(database_url, d) for d in DEVICES]
        assert {row["last_seen_at"] for row in rows} == {minutes(10)}
        # Remembered again: the next heartbeats within the precision are not written.
        await stream.deliver([heartbeat(d, minutes(12), user_id=f"user-{d}") for d in DEVICES])
        rows = [await device_row(database_url, d) for d in DEVICES]
        assert {row["last_seen_at"] for row in rows} == {minutes(10)}
        assert staying.terminate() == 0


def stream_in_phases() -> list[list[dict[str, Any]]]:
    """Installs; heartbeats within the precision; user changes, uninstalls and heartbeats
    past it; reinstalls by heartbeat; heartbeats within the precision again."""
    even, odd = DEVICES[::2], DEVICES[1::2]
    return [
        [install(d, minutes(0), user_id=f"user-{d[-1]}") for d in DEVICES]
        + [install(d, minutes(0), user_id=None, customer="globex") for d in even],
        [heartbeat(d, minutes(5), user_id=f"user-{d[-1]}") for d in DEVICES]
        + [heartbeat(d, minutes(6), user_id=None, customer="globex") for d in even],
        [heartbeat(d, minutes(20), user_id="shared") for d in even]
        + [uninstall(d, minutes(21)) for d in odd]
        + [heartbeat(d, minutes(22), device_kind="personal", customer="globex") for d in even],
        [heartbeat(d, minutes(23)) for d in odd]
        + [heartbeat(d, minutes(36), user_id="shared") for d in even],
        [heartbeat(d, minutes(40)) for d in DEVICES]
        + [heartbeat(d, minutes(34), customer="globex") for d in even],
    ]


STATE_QUERIES = [
    "SELECT customer_id, device_id, user_id, device_kind, first_seen_at, last_seen_at, "
    "last_present_at, last_installed_at, last_uninstalled_at, protected, hostname, os, "
    "agent_version, user_reported_at, kind_reported_at FROM devices "
    "ORDER BY customer_id, device_id",
    "SELECT customer_id, user_id, first_seen_at, last_seen_at FROM users "
    "ORDER BY customer_id, user_id",
    # Not the effective times: with the settle window at 0 (tests/support.make_settings),
    # some depend on batch boundaries and the decision clock, with or without replicas
    # (docs/licensing.md, "Settled allocations").
    "SELECT customer_id, subject_type, subject_id, active, basis "
    "FROM licenses ORDER BY customer_id, subject_type, subject_id",
]


async def stored_state(database_url: str) -> list[list[tuple[Any, ...]]]:
    return [[tuple(row) for row in await fetch(database_url, sql)] for sql in STATE_QUERIES]


async def test_two_replicas_store_what_one_replica_stores(
    services: Services,
    database_url: str,
    topics: dict[str, str],
    template_database: str,
    tmp_path: Path,
) -> None:
    second_url = await services.create_database("license_test", template=template_database)
    await services.set_up_roles(second_url)
    second_topics = fresh_topic_names()
    await create_topics(services.kafka_bootstrap_servers, second_topics, partitions=4)
    states = []
    try:
        for url, names, count in (
            (database_url, topics, 1),
            (services.worker_url(second_url), second_topics, 2),
        ):
            settings = precise_settings(services, url, names)
            stream = Stream(services, settings)
            with worker_processes(settings, tmp_path, count) as workers:
                await wait_for_assignments(workers, settings)
                for phase in stream_in_phases():
                    await stream.deliver(phase)
                # Skipping happened: the last heartbeats (minute 40) are not stored...
                assert (await device_row(url, DEVICES[0]))["last_seen_at"] == minutes(36)
                assert all(worker.terminate() == 0 for worker in workers)
            # ...until each replica writes what it kept back as it stops.
            assert (await device_row(url, DEVICES[0]))["last_seen_at"] == minutes(40)
            states.append(await stored_state(url))
    finally:
        await services.drop_database(second_url)

    one, two = states
    assert two == one


async def test_without_co_partitioned_topics_every_heartbeat_is_written(
    services: Services, database_url: str
) -> None:
    names = fresh_topic_names()
    admin = AIOKafkaAdminClient(bootstrap_servers=services.kafka_bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(names["heartbeat_topic"], 4, 1, topic_configs=AGENT_TOPIC_CONFIG),
                NewTopic(names["lifecycle_topic"], 2, 1, topic_configs=AGENT_TOPIC_CONFIG),
                *(
                    NewTopic(names[key], 1, 1)
                    for key in ("dlq_topic", "license_events_topic", "admin_topic")
                ),
            ]
        )
    finally:
        await admin.close()
    settings = precise_settings(services, database_url, names)
    stream = Stream(services, settings)
    async with running_worker(settings, clock=FixedClock(NOW)):
        await stream.deliver([install("laptop", minutes(0), user_id="alice")])
        await stream.deliver([heartbeat("laptop", minutes(5), user_id="alice")])

        assert (await device_row(database_url, "laptop"))["last_seen_at"] == minutes(5)
        assert REGISTRY.get_sample_value("license_worker_last_seen_skipping") == 0


@pytest.mark.parametrize("memory_devices", [0])
async def test_a_memory_of_no_devices_writes_every_heartbeat(
    services: Services, database_url: str, topics: dict[str, str], memory_devices: int
) -> None:
    settings = precise_settings(
        services, database_url, topics, last_seen_memory_devices=memory_devices
    )
    stream = Stream(services, settings)
    async with running_worker(settings, clock=FixedClock(NOW)):
        await stream.deliver([install("laptop", minutes(0), user_id="alice")])
        await stream.deliver([heartbeat("laptop", minutes(5), user_id="alice")])
        await asyncio.sleep(0)

    assert (await device_row(database_url, "laptop"))["last_seen_at"] == minutes(5)


async def rows_written(database_url: str) -> dict[str, tuple[int, int]]:
    """Rows inserted and updated per table, as Postgres counts them (flushed when the
    worker's connections close)."""
    rows = await fetch(
        database_url,
        "SELECT relname, n_tup_ins, n_tup_upd FROM pg_stat_user_tables "
        "WHERE relname IN ('devices', 'users')",
    )
    return {row["relname"]: (row["n_tup_ins"], row["n_tup_upd"]) for row in rows}


@pytest.mark.parametrize(
    ("precision_seconds", "device_updates"),
    # Rounds at minutes 5..25: every one written, or minute 15's (15 after 0) and, as the
    # worker stops, what it kept back (minute 25).
    [(0, 5 * 40), (PRECISION.total_seconds(), 2 * 40)],
)
async def test_a_steady_fleet_writes_one_row_per_device_and_precision(
    services: Services,
    database_url: str,
    topics: dict[str, str],
    precision_seconds: float,
    device_updates: int,
) -> None:
    """Before and after, in rows: 40 devices heartbeating every 5 minutes for 25 minutes."""
    settings = make_settings(
        services, database_url, topics, last_seen_precision_seconds=precision_seconds
    )
    stream = Stream(services, settings)
    fleet = DEVICES + [f"device-{number:02d}" for number in range(12, 40)]
    async with running_worker(settings, clock=FixedClock(NOW)):
        await stream.deliver([install(d, minutes(0), user_id=f"user-{d}") for d in fleet])
        for minute in range(5, 30, 5):
            await stream.deliver(
                [heartbeat(d, minutes(minute), user_id=f"user-{d}") for d in fleet]
            )

    async def counted() -> bool:
        return (await rows_written(database_url))["devices"][0] == len(fleet)

    await wait_until(counted, timeout=30)
    written = await rows_written(database_url)
    print(f"precision {precision_seconds:.0f} s: rows (inserted, updated) {written}")
    assert written["devices"] == (len(fleet), device_updates)

"""Helpers for license tests: send agent events, ingest them on a set clock, sweep, and read
what billing receives."""

from __future__ import annotations

import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from tests.support import (
    Services,
    committed_offsets_total,
    encode,
    fetch,
    produce,
    read_all,
    running_worker,
    wait_until,
)
from worker.clock import FixedClock
from worker.db.repository import Repository
from worker.kafka.clients import PartitionEnds
from worker.licensing.relay import publish_pending_once
from worker.licensing.sweep_report import SweepReport
from worker.licensing.sweeper import Sweeper
from worker.settings import Settings
from worker.sim.fleet import SimulatedDevice, agent_event

# Close to the real time: the sweeper compares its clock with the broker's timestamps.
DAY0 = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)


def day(number: float) -> datetime:
    return DAY0 + timedelta(days=number)


ALICE = SimulatedDevice("acme", "alice-laptop", "alice@acme.example", "business")
ALICE_DEVICES = [
    ALICE,
    SimulatedDevice("acme", "alice-phone", "alice@acme.example", "personal"),
    SimulatedDevice("acme", "alice-tablet", "alice@acme.example", "personal"),
    SimulatedDevice("acme", "alice-watch", "alice@acme.example", "personal"),  # over allowance
]
KIOSK = SimulatedDevice("acme", "kiosk-1", None, "business")  # unassigned


async def send(
    services: Services, settings: Settings, events: list[tuple[SimulatedDevice, str, datetime]]
) -> int:
    by_topic: dict[str, list[tuple[bytes, bytes]]] = {}
    for device, event_type, at in events:
        topic = settings.heartbeat_topic if event_type == "heartbeat" else settings.lifecycle_topic
        by_topic.setdefault(topic, []).append(
            (device.key, encode(agent_event(device, event_type, at)))
        )
    for topic, messages in by_topic.items():
        await produce(services.kafka_bootstrap_servers, topic, messages)
    return sum(len(messages) for messages in by_topic.values())


async def ingest(services: Services, settings: Settings, at: datetime, expected_total: int) -> None:
    """Runs the worker (clock at `at`) until every agent message so far is committed."""
    await run_until_committed(
        services, settings, at, settings.consumer_group, settings.agent_topics, expected_total
    )


async def run_until_committed(
    services: Services,
    settings: Settings,
    at: datetime,
    group: str,
    topics: Iterable[str],
    expected_total: int,
) -> None:
    """Runs the worker (clock at `at`) until `group` has committed `expected_total` messages
    of `topics`."""
    async with running_worker(settings, clock=FixedClock(at)):

        async def committed() -> bool:
            total = await committed_offsets_total(services.kafka_bootstrap_servers, group, topics)
            return total >= expected_total

        await wait_until(committed, timeout=60)


@contextlib.asynccontextmanager
async def sweeper_at(settings: Settings, at: datetime) -> AsyncIterator[Sweeper]:
    repository = await Repository.connect(settings.database_url.get_secret_value(), 2)
    ends = PartitionEnds(settings)
    await ends.start()
    try:
        yield Sweeper(settings, repository, ends, FixedClock(at))
    finally:
        await ends.stop()
        await repository.close()


async def sweep(settings: Settings, at: datetime, **options: Any) -> SweepReport:
    async with sweeper_at(settings, at) as sweeper:
        report = await sweeper.run_once(**options)
    await publish_outbox(settings, at)
    return report


async def publish_outbox(settings: Settings, at: datetime | None = None) -> int:
    """Publishes the outbox with the relay's clock at `at` (default: now): allocations
    settled by then."""
    return await publish_pending_once(settings, FixedClock(at) if at else None)


async def billing_view(
    services: Services, settings: Settings, expected: int
) -> list[dict[str, Any]]:
    """What billing receives: the topic's events, de-duplicated by event_id."""
    records = await read_all(
        services.kafka_bootstrap_servers, settings.license_events_topic, expected, timeout=20
    )
    seen: dict[str, dict[str, Any]] = {}
    for record in records:
        event = orjson.loads(record.value)
        assert record.key == event["customer_id"].encode()
        seen.setdefault(event["event_id"], event)
    return list(seen.values())


def summary(events: list[dict[str, Any]]) -> Counter[tuple[str, str, str | None]]:
    return Counter((e["type"], e["subject_id"], e["reason"]) for e in events)


def admin_event(event_type: str, customer_id: str, at: datetime, **fields: Any) -> dict[str, Any]:
    """A console message of schemas/admin_events.py."""
    return {
        "schema_version": 1,
        "event_id": str(uuid.uuid4()),
        "type": event_type,
        "customer_id": customer_id,
        "occurred_at": at.isoformat(),
        **fields,
    }


async def send_admin(
    services: Services, settings: Settings, events: list[dict[str, Any]] | list[bytes]
) -> int:
    """Produces console messages (dicts, or raw bytes for bad input) keyed by customer."""
    messages = []
    for event in events:
        value = event if isinstance(event, bytes) else encode(event)
        key = event["customer_id"].encode() if isinstance(event, dict) else b"bad"
        messages.append((key, value))
    return await produce(services.kafka_bootstrap_servers, settings.admin_topic, messages)


async def apply_admin(
    services: Services, settings: Settings, at: datetime, expected_total: int
) -> None:
    """Runs the worker (clock at `at`) until every console message so far is committed."""
    await run_until_committed(
        services,
        settings,
        at,
        settings.admin_consumer_group,
        [settings.admin_topic],
        expected_total,
    )


async def rows_containing(settings: Settings, needle: str) -> list[str]:
    """Every table of the public schema, searched as text for `needle`."""
    url = settings.database_url.get_secret_value()
    tables = [
        r["table_name"]
        for r in await fetch(
            url, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
    ]
    found = []
    for table in tables:
        rows = await fetch(
            url, f'SELECT t::text AS line FROM "{table}" AS t WHERE t::text LIKE $1', f"%{needle}%"
        )
        found += [f"{table}: {row['line']}" for row in rows]
    return found


TEXT_COLUMNS = """
SELECT c.table_name, c.column_name
FROM information_schema.columns AS c
JOIN information_schema.tables AS t USING (table_schema, table_name)
WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE'
  AND c.data_type IN ('text', 'character varying', 'character', 'json', 'jsonb')
ORDER BY c.table_name, c.column_name
"""


async def columns_containing(url: str, needle: str) -> list[str]:
    """Every text, varchar, json and jsonb column of every table of the public schema,
    searched for `needle` without case (found generically: a new table is searched too).
    `url` must see every table (the superuser's: the worker cannot read the migrations')."""
    found = []
    for column in await fetch(url, TEXT_COLUMNS):
        table, name = column["table_name"], column["column_name"]
        rows = await fetch(
            url,
            f'SELECT count(*) AS n FROM "{table}" WHERE "{name}"::text ILIKE $1',
            f"%{needle}%",
        )
        if rows[0]["n"]:
            found.append(f"{table}.{name}: {rows[0]['n']} rows")
    return found

"""`license-worker dlq inspect` and `dlq replay`, end to end: bad input and a database
refusal land in the DLQ, the operator inspects them, fixes the cause, replays, and the
worker stores what it could not before."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from hashlib import sha256

import asyncpg
import pytest

from tests.acceptance.test_cli import run_cli
from tests.support import (
    POISON_TRIGGER,
    Services,
    committed_offsets_total,
    create_topics_with_limits,
    encode,
    fetch,
    make_settings,
    produce,
    produce_to_partitions,
    read_all,
    running_worker,
    settings_environment,
    wait_until,
)
from worker.settings import Settings
from worker.sim.fleet import SimulatedDevice, agent_event

pytestmark = pytest.mark.acceptance


async def execute(database_url: str, sql: str) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


async def ingest_all(services: Services, settings: Settings, expected: int) -> None:
    async with running_worker(settings):

        async def committed() -> bool:
            total = await committed_offsets_total(
                services.kafka_bootstrap_servers, settings.consumer_group, settings.agent_topics
            )
            return total >= expected

        await wait_until(committed, timeout=60)


async def test_inspect_fix_replay(
    services: Services, database_url: str, topics: dict[str, str]
) -> None:
    settings = make_settings(services, database_url, topics, sweep_enabled=False)
    environment = settings_environment(settings)
    await execute(services.owner_url(database_url), POISON_TRIGGER)
    now = datetime.now(UTC)
    messages = [
        (device.key, encode(agent_event(device, "heartbeat", now)))
        for device in (
            SimulatedDevice("c1", "good", None, "business"),
            SimulatedDevice("c1", "poison", None, "business"),
        )
    ]
    messages.append((b"c1:broken", b"{not json"))
    await produce(services.kafka_bootstrap_servers, settings.heartbeat_topic, messages)
    await ingest_all(services, settings, 3)

    inspected = await asyncio.to_thread(run_cli, environment, "dlq", "inspect")
    assert inspected.returncode == 0, inspected.stderr
    assert "2 dead letters" in inspected.stdout
    assert "1  database_rejected" in inspected.stdout
    assert "1  invalid_json" in inspected.stdout
    assert "'{not json'" in inspected.stdout

    await execute(
        services.owner_url(database_url), "DROP TRIGGER reject_poison ON devices"
    )  # the fix
    dry = await asyncio.to_thread(
        run_cli, environment, "dlq", "replay", "--reason", "database_rejected", "--dry-run"
    )
    assert "would replay 1 messages" in dry.stdout
    replayed = await asyncio.to_thread(
        run_cli, environment, "dlq", "replay", "--reason", "database_rejected"
    )
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1 messages" in replayed.stdout

    source = await read_all(services.kafka_bootstrap_servers, settings.heartbeat_topic, 4)
    [again] = [record for record in source if dict(record.headers or ()).get("dlq.replayed_from")]
    assert again.key == b"c1:poison"
    assert again.value == messages[1][1], "replayed unchanged"
    await ingest_all(services, settings, 4)
    stored = {
        row["device_id"] for row in await fetch(database_url, "SELECT device_id FROM devices")
    }
    assert stored == {"good", "poison"}


async def test_a_truncated_dead_letter_is_inspected_but_never_replayed(
    services: Services, database_url: str
) -> None:
    """A message too large for the DLQ is there truncated; replay skips it and says where
    the whole message is, and still replays the others."""
    topics = await create_topics_with_limits(services)
    settings = make_settings(services, database_url, topics, sweep_enabled=False)
    environment = settings_environment(settings)
    huge = b"x" * 1_048_500
    await produce_to_partitions(
        services, settings.heartbeat_topic, {0: [(b"c1:huge", huge), (b"c1:broken", b"{no")]}
    )
    await ingest_all(services, settings, 2)

    inspected = await asyncio.to_thread(run_cli, environment, "dlq", "inspect")
    assert inspected.returncode == 0, inspected.stderr
    assert "2 dead letters" in inspected.stdout
    original = f"{settings.heartbeat_topic}[0]@0, 1048500 bytes, sha256 {sha256(huge).hexdigest()}"
    assert f"truncated: the original is {original}" in inspected.stdout
    assert "1 truncated (too large for the DLQ)" in inspected.stdout

    dry = await asyncio.to_thread(run_cli, environment, "dlq", "replay", "--dry-run")
    assert "would replay 1 messages" in dry.stdout
    assert "skipped 1 truncated dead letters" in dry.stdout
    replayed = await asyncio.to_thread(run_cli, environment, "dlq", "replay")
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1 messages" in replayed.stdout
    assert f"truncated: the original is {original}" in replayed.stdout

    source = await read_all(services.kafka_bootstrap_servers, settings.heartbeat_topic, 3)
    again = [record for record in source if dict(record.headers or ()).get("dlq.replayed_from")]
    assert [record.key for record in again] == [b"c1:broken"], "the truncated one stays out"

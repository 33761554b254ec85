"""The benchmark's minimal pipeline (scripts/bench/peer.py) on the real broker and database:
it stores each device's newest time, never an older one, and resumes from its commits (as
the steady-state shape needs after the fleet stored beforehand)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from scripts.bench import scenario
from scripts.bench.code_under_test import UnderTest
from scripts.bench.peer import count_peer_devices, create_peer_table, drain
from scripts.bench.scenario import commit_offsets
from tests.support import (
    Services,
    committed_offsets_total,
    encode,
    make_settings,
    produce,
)
from worker.kafka.clients import create_consumer

pytestmark = pytest.mark.integration
AGENT_TOPICS = ("heartbeat_topic", "lifecycle_topic")


def services_of(services: Services) -> scenario.Services:
    """The benchmark's view of the test services."""
    return scenario.Services(services.kafka_bootstrap_servers, services.database_url)


def event(kind: str, device: str, at: str) -> tuple[bytes, bytes]:
    return (
        f"cust-1:{device}".encode(),
        encode(
            {
                "schema_version": 1,
                "type": kind,
                "customer_id": "cust-1",
                "device_id": device,
                "occurred_at": at,
            }
        ),
    )


async def stored(url: str) -> dict[str, datetime]:
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            "SELECT device_id, last_seen_at, last_seen_day FROM bench_peer_last_seen"
        )
    finally:
        await connection.close()
    assert all(row["last_seen_day"] == row["last_seen_at"].astimezone(UTC).date() for row in rows)
    return {row["device_id"]: row["last_seen_at"] for row in rows}


async def test_the_peer_stores_the_newest_time_of_each_device_and_resumes_from_its_commits(
    services: Services,
    database_url: str,
    topics: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The worker's settings and consumer, as the benchmark imports them from its snapshot.
    monkeypatch.setattr(
        UnderTest,
        "Settings",
        lambda **values: make_settings(services, values.pop("database_url"), {}, **values),
        raising=False,
    )
    monkeypatch.setattr(UnderTest, "create_consumer", create_consumer, raising=False)
    url = services.superuser_url(database_url)  # the benchmark creates the table as owner
    await create_peer_table(url)
    bootstrap = services.kafka_bootstrap_servers
    arguments: dict[str, Any] = {
        "kafka_bootstrap_servers": bootstrap,
        "database_url": url,
        "group": topics["consumer_group"],
        "topics": {name: topics[name] for name in (*AGENT_TOPICS, "dlq_topic")},
        "limit_seconds": 60,
    }
    await produce(
        bootstrap,
        topics["heartbeat_topic"],
        [
            event("heartbeat", "a", "2026-12-03T10:00:00Z"),
            event("heartbeat", "a", "2026-12-03T10:10:00Z"),
            event("heartbeat", "a", "2026-12-03T12:05:00+02:00"),  # 10:05 UTC: older
            event("heartbeat", "c", "2026-12-03T08:00:00Z"),
        ],
    )
    await produce(
        bootstrap, topics["lifecycle_topic"], [event("install", "b", "2026-12-03T09:00:00Z")]
    )

    first = await drain({**arguments, "expected": 5})

    assert first.messages == 5
    assert await stored(url) == {
        "a": datetime(2026, 12, 3, 10, 10, tzinfo=UTC),
        "b": datetime(2026, 12, 3, 9, 0, tzinfo=UTC),
        "c": datetime(2026, 12, 3, 8, 0, tzinfo=UTC),
    }
    agent_topics = [topics[name] for name in AGENT_TOPICS]
    assert await committed_offsets_total(bootstrap, topics["consumer_group"], agent_topics) == 5

    await produce(
        bootstrap,
        topics["heartbeat_topic"],
        [
            event("heartbeat", "a", "2026-12-03T09:00:00Z"),  # older than stored: kept
            event("heartbeat", "c", "2026-12-03T08:05:00Z"),
        ],
    )
    second = await drain({**arguments, "expected": 2})

    assert second.messages == 2  # from its commits, not the topics' start
    assert await stored(url) == {
        "a": datetime(2026, 12, 3, 10, 10, tzinfo=UTC),
        "b": datetime(2026, 12, 3, 9, 0, tzinfo=UTC),
        "c": datetime(2026, 12, 3, 8, 5, tzinfo=UTC),
    }
    assert await count_peer_devices(url) == 3
    assert await committed_offsets_total(bootstrap, topics["consumer_group"], agent_topics) == 7


async def test_a_group_whose_offsets_were_committed_beforehand_starts_after_them(
    services: Services,
    database_url: str,
    topics: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """How the steady shape's read limit skips the fleet stored beforehand."""
    monkeypatch.setattr(
        UnderTest,
        "Settings",
        lambda **values: make_settings(services, values.pop("database_url"), {}, **values),
        raising=False,
    )
    monkeypatch.setattr(UnderTest, "create_consumer", create_consumer, raising=False)
    url = services.superuser_url(database_url)
    await create_peer_table(url)
    bootstrap = services.kafka_bootstrap_servers
    heartbeats = topics["heartbeat_topic"]
    await produce(
        bootstrap,
        heartbeats,
        [event("heartbeat", f"old-{n}", "2026-12-03T08:00:00Z") for n in range(6)],
    )
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        partitions = [
            TopicPartition(topic, p)
            for topic in (heartbeats, topics["lifecycle_topic"])
            for p in range(4)
        ]
        ends = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
    await commit_offsets(
        services_of(services),
        topics["consumer_group"],
        {(tp.topic, tp.partition): offset for tp, offset in ends.items()},
    )
    await produce(
        bootstrap,
        heartbeats,
        [event("heartbeat", f"new-{n}", "2026-12-03T09:00:00Z") for n in range(2)],
    )

    result = await drain(
        {
            "kafka_bootstrap_servers": bootstrap,
            "database_url": url,
            "group": topics["consumer_group"],
            "topics": {name: topics[name] for name in (*AGENT_TOPICS, "dlq_topic")},
            "limit_seconds": 60,
            "expected": 2,
        }
    )

    assert result.messages == 2
    assert set(await stored(url)) == {"new-0", "new-1"}

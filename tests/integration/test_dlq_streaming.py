"""The DLQ tools on real Kafka, with a hostile DLQ: `dlq inspect` and `dlq replay` stream
it in bounded memory, and replay writes only to the agent and console topics, whatever a
dead letter's headers name."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import Sequence

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from tests.support import (
    Services,
    make_settings,
    read_all,
    run_cli,
    settings_environment,
)
from worker.ingest.dlq_tools import inspect_dead_letters, replay_dead_letters
from worker.kafka.clients import describe_partitions
from worker.settings import Settings

pytestmark = pytest.mark.integration

LETTERS = 1500
LETTER_BYTES = 20_000  # 30 MB of dead letters in all
PEAK_BOUND_BYTES = 10_000_000


def dlq_headers(source_topic: str, reason: str = "database_rejected") -> list[tuple[str, bytes]]:
    return [
        ("trace", b"t-1"),
        ("dlq.error.class", reason.encode()),
        ("dlq.error.message", b"refused"),
        ("dlq.source.topic", source_topic.encode()),
        ("dlq.source.partition", b"0"),
        ("dlq.source.offset", b"7"),
        ("dlq.failed_at", b"2026-12-01T00:00:00+00:00"),
    ]


async def produce_dead_letters(
    services: Services, topic: str, letters: Sequence[tuple[bytes, bytes, str]]
) -> None:
    """(key, value, source topic named in the headers) for each letter, as the worker
    writes them, or as someone who can write to the DLQ forges them."""
    producer = AIOKafkaProducer(
        bootstrap_servers=services.kafka_bootstrap_servers, linger_ms=20, acks="all"
    )
    await producer.start()
    try:
        deliveries = [
            await producer.send(topic, key=key, value=value, headers=dlq_headers(source))
            for key, value, source in letters
        ]
        await asyncio.gather(*deliveries)
    finally:
        await producer.stop()


async def end_offsets(services: Services, topic: str) -> int:
    """How many records `topic` ever received (0 if it does not exist)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=services.kafka_bootstrap_servers)
    await admin.start()
    try:
        partitions = await describe_partitions(admin, [topic])
    finally:
        await admin.close()
    if not partitions:
        return 0
    consumer = AIOKafkaConsumer(bootstrap_servers=services.kafka_bootstrap_servers)
    await consumer.start()
    try:
        return sum((await consumer.end_offsets(partitions)).values())
    finally:
        await consumer.stop()


@pytest.fixture
async def large_dlq(services: Services, database_url: str, topics: dict[str, str]) -> Settings:
    settings = make_settings(services, database_url, topics)
    value = b"x" * LETTER_BYTES
    letters = [(f"c1:d{n}".encode(), value, settings.heartbeat_topic) for n in range(LETTERS)]
    await produce_dead_letters(services, settings.dlq_topic, letters)
    return settings


async def peak_memory_of(operation: asyncio.Future[object] | object) -> tuple[object, int]:
    tracemalloc.start()
    try:
        result = await operation  # type: ignore[misc]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


async def test_inspect_streams_a_dlq_much_larger_than_its_memory_bound(
    large_dlq: Settings,
) -> None:
    inspection, peak = await peak_memory_of(inspect_dead_letters(large_dlq, samples_per_reason=3))
    assert inspection.total == LETTERS  # type: ignore[attr-defined]
    assert inspection.by_reason == {"database_rejected": LETTERS}  # type: ignore[attr-defined]
    assert peak < PEAK_BOUND_BYTES, f"peak {peak:,} bytes for {LETTERS * LETTER_BYTES:,}"


async def test_replay_streams_a_dlq_much_larger_than_its_memory_bound(
    services: Services, large_dlq: Settings
) -> None:
    report, peak = await peak_memory_of(replay_dead_letters(large_dlq))
    assert report.sent == LETTERS  # type: ignore[attr-defined]
    assert peak < PEAK_BOUND_BYTES, f"peak {peak:,} bytes for {LETTERS * LETTER_BYTES:,}"
    assert await end_offsets(services, large_dlq.heartbeat_topic) == LETTERS


async def test_replay_never_writes_to_a_topic_outside_the_agent_and_console_topics(
    services: Services, database_url: str, topics: dict[str, str]
) -> None:
    settings = make_settings(services, database_url, topics)
    stray_topic = f"{settings.heartbeat_topic}.stray"
    await produce_dead_letters(
        services,
        settings.dlq_topic,
        [
            (b"c1:d1", b'{"honest": "heartbeat"}', settings.heartbeat_topic),
            (b"c1:d2", b'{"forged": "license event"}', settings.license_events_topic),
            (b"c1:d3", b'{"honest": "console"}', settings.admin_topic),
            (b"c1:d4", b'{"forged": "anywhere"}', stray_topic),
            (b"c1:d5", b'{"forged": "the dlq itself"}', settings.dlq_topic),
        ],
    )
    environment = settings_environment(settings)

    dry = await asyncio.to_thread(run_cli, environment, "dlq", "replay", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would replay 2 messages" in dry.stdout
    replayed = await asyncio.to_thread(run_cli, environment, "dlq", "replay")
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 2 messages" in replayed.stdout
    assert "skipped 3 dead letters naming a topic replay never writes to" in replayed.stdout
    for topic in (settings.license_events_topic, stray_topic, settings.dlq_topic):
        assert f"{topic!r}" in replayed.stdout

    assert await end_offsets(services, settings.license_events_topic) == 0
    assert await end_offsets(services, stray_topic) == 0
    assert await end_offsets(services, settings.dlq_topic) == 5, "the DLQ only read"
    [heartbeat] = await read_all(services.kafka_bootstrap_servers, settings.heartbeat_topic, 1)
    assert heartbeat.value == b'{"honest": "heartbeat"}'
    [console] = await read_all(services.kafka_bootstrap_servers, settings.admin_topic, 1)
    assert console.value == b'{"honest": "console"}'

    # Asking for the forged topic by name replays nothing either.
    chosen = await asyncio.to_thread(
        run_cli,
        environment,
        "dlq",
        "replay",
        "--source-topic",
        settings.license_events_topic,
    )
    assert chosen.returncode == 0, chosen.stderr
    assert "replayed 0 messages" in chosen.stdout
    assert await end_offsets(services, settings.license_events_topic) == 0

"""Operations against the real services: lag as the broker sees it, a stalled partition
flipping /livez and recovering by itself, readiness."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from tests.support import (
    Services,
    encode,
    fetchval,
    free_port,
    make_settings,
    metric,
    running_worker,
    wait_until,
)
from tests.support import http_get as get
from worker.sim.fleet import SimulatedDevice, agent_event

pytestmark = pytest.mark.integration


async def broker_lag(services: Services, group: str, partition: TopicPartition) -> int:
    """End offset minus committed offset, as the broker's own admin API reports them."""
    admin = AIOKafkaAdminClient(bootstrap_servers=services.kafka_bootstrap_servers)
    consumer = AIOKafkaConsumer(bootstrap_servers=services.kafka_bootstrap_servers)
    await admin.start()
    await consumer.start()
    try:
        committed = (await admin.list_consumer_group_offsets(group)).get(partition)
        end = (await consumer.end_offsets([partition]))[partition]
    finally:
        await consumer.stop()
        await admin.close()
    return end - (committed.offset if committed is not None and committed.offset >= 0 else 0)


async def test_stalled_partition_shows_broker_lag_flips_livez_and_recovers(
    services: Services, database_url: str, topics: dict[str, str]
) -> None:
    port = free_port()
    settings = make_settings(
        services,
        database_url,
        topics,
        metrics_port=port,
        monitor_interval_seconds=0.3,
        stuck_partition_seconds=3,
        sweep_enabled=False,
    )
    stalled = TopicPartition(settings.heartbeat_topic, 0)
    async with running_worker(settings) as worker:

        async def assigned() -> bool:
            return worker._assignment() == {
                (topic, p) for topic in settings.agent_topics for p in range(4)
            }

        await wait_until(assigned, timeout=30)
        status, body = await asyncio.to_thread(get, port, "/livez")
        assert status == 200, body
        worker._consumer.pause(stalled)  # a consumer bug, simulated: this partition stops
        await _produce_to(services, stalled, 40)

        async def lag_reported() -> bool:
            _, text = await asyncio.to_thread(get, port, "/metrics")
            value = metric(
                text,
                "license_worker_consumer_lag_messages",
                group=settings.consumer_group,
                partition="0",
                topic=stalled.topic,
            )
            return value == 40

        await wait_until(lag_reported, timeout=10, interval=0.1)
        assert await broker_lag(services, settings.consumer_group, stalled) == 40
        _, text = await asyncio.to_thread(get, port, "/metrics")
        assert metric(
            text,
            "license_worker_consumer_lag_seconds",
            group=settings.consumer_group,
            partition="0",
            topic=stalled.topic,
        ) == float("inf")

        async def livez_failing() -> bool:
            status, _ = await asyncio.to_thread(get, port, "/livez")
            return status == 503

        await wait_until(livez_failing, timeout=15, interval=0.1)
        _, problems = await asyncio.to_thread(get, port, "/livez")
        assert f"partition {stalled.topic}[0] stuck" in orjson.loads(problems)["problems"]

        async def recovered() -> bool:
            status, _ = await asyncio.to_thread(get, port, "/livez")
            stored = await fetchval(database_url, "SELECT count(*) FROM devices")
            return status == 200 and stored == 40

        await wait_until(recovered, timeout=60)
        _, text = await asyncio.to_thread(get, port, "/metrics")
        assert metric(text, "license_worker_consumer_recreations_total") == 1.0
        assert await broker_lag(services, settings.consumer_group, stalled) == 0
        status, _ = await asyncio.to_thread(get, port, "/readyz")
        assert status == 200


async def _produce_to(services: Services, partition: TopicPartition, count: int) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=services.kafka_bootstrap_servers)
    await producer.start()
    try:
        for number in range(count):
            device = SimulatedDevice("c1", f"stalled-{number}", None, "business")
            event = agent_event(device, "heartbeat", datetime.now(UTC))
            await producer.send(
                partition.topic, encode(event), key=device.key, partition=partition.partition
            )
        await producer.flush()
    finally:
        await producer.stop()

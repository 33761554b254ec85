"""A consumer joins its group with one JoinGroup. aiokafka 0.14 sends one per configured
assignor, the later ones with a longer protocol list: the coordinator takes that as changed
metadata and starts another rebalance ("Updating metadata for member ... during
CompletingRebalance"), every member does the same at every join, and under load the group
never settles. The full fault run saw it: about 1,800 generations of the console's group in
five minutes, customers not created, their signals dead-lettered. Real Kafka."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.errors import InconsistentGroupProtocolError
from structlog.testing import capture_logs

from tests.support import Services, make_settings
from worker.kafka.clients import create_consumer, start_with_retry

pytestmark = pytest.mark.integration


def generation(consumer: object) -> int:
    """The generation the consumer's last join gave it (aiokafka's coordinator)."""
    return int(consumer._coordinator.generation)  # type: ignore[attr-defined]


async def test_a_lone_member_joins_in_one_generation(
    services: Services, database_url: str, topics: dict[str, str]
) -> None:
    settings = make_settings(services, database_url, topics)
    consumer = create_consumer(settings, f"{settings.consumer_group}-lone")
    consumer.subscribe(list(settings.agent_topics))
    await consumer.start()
    try:
        assert len(consumer.assignment()) == 8  # both topics' 4 partitions
        assert generation(consumer) == 1
    finally:
        await consumer.stop()


async def test_three_members_share_one_early_generation(
    services: Services, database_url: str, topics: dict[str, str]
) -> None:
    """Three members starting together: at most one generation each, whatever the order."""
    settings = make_settings(services, database_url, topics)
    group = f"{settings.consumer_group}-three"
    consumers = [create_consumer(settings, group) for _ in range(3)]
    for consumer in consumers:
        consumer.subscribe(list(settings.agent_topics))
    await asyncio.gather(*(consumer.start() for consumer in consumers))
    try:

        async def settled() -> None:
            while (
                len({generation(c) for c in consumers}) > 1
                or sum(len(c.assignment()) for c in consumers) != 8
            ):
                await asyncio.gather(*(c.getmany(timeout_ms=100) for c in consumers))

        await asyncio.wait_for(settled(), timeout=30)
        assert {generation(c) for c in consumers} <= {1, 2, 3}
    finally:
        await asyncio.gather(*(consumer.stop() for consumer in consumers))


async def test_a_member_of_a_round_robin_release_is_refused_with_a_clear_line(
    services: Services, database_url: str, topics: dict[str, str]
) -> None:
    """Releases before 2026-12-03 used round robin only: the two cannot share a group, and
    the new consumer says why (docs/operations.md, Upgrades)."""
    settings = make_settings(services, database_url, topics)
    group = f"{settings.consumer_group}-mixed"
    old = AIOKafkaConsumer(
        settings.heartbeat_topic,
        bootstrap_servers=services.kafka_bootstrap_servers,
        group_id=group,
        partition_assignment_strategy=(RoundRobinPartitionAssignor,),
    )
    await old.start()
    new = create_consumer(settings, group)
    new.subscribe([settings.heartbeat_topic])
    try:
        with capture_logs() as logs, pytest.raises(InconsistentGroupProtocolError):
            await asyncio.wait_for(start_with_retry("kafka-consumer", new.start, settings), 30)
    finally:
        await new.stop()
        await old.stop()
    assert [entry["event"] for entry in logs if entry["log_level"] == "error"] == [
        "kafka.group_protocol_mismatch"
    ]

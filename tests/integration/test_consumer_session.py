"""The consumer session on its own (worker/ingest/consumer_session.py): the agent and console
loops' shared Kafka mechanics, against a real broker and a real database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiokafka import TopicPartition

from tests.service_fixtures import Services
from tests.support import make_settings, produce
from worker.clock import SystemClock
from worker.db.repository import Repository
from worker.ingest.consumer_session import ConsumerSession, PermanentDatabaseError
from worker.kafka.clients import create_consumer
from worker.retry import Stopped
from worker.settings import Settings


@pytest.fixture
async def repository(database_url: str) -> AsyncIterator[Repository]:
    repository = await Repository.connect(database_url, 2)
    yield repository
    await repository.close()


@pytest.fixture
def settings(services: Services, database_url: str, topics: dict[str, str]) -> Settings:
    return make_settings(services, database_url, topics)


def session_on(
    settings: Settings, consumer: Any, repository: Repository, stopping: asyncio.Event
) -> ConsumerSession:
    return ConsumerSession(
        settings=settings,
        consumer=consumer,
        producer=None,  # nothing here is dead-lettered
        repository=repository,
        clock=SystemClock(),
        stopping=stopping,
        beat=lambda: None,
        task="test",
    )


async def test_a_fetched_batch_commits_its_next_offsets_on_assigned_partitions_only(
    settings: Settings, repository: Repository
) -> None:
    topic = settings.heartbeat_topic
    await produce(settings.kafka_bootstrap_servers, topic, [(b"k", b"%d" % n) for n in range(3)])
    consumer = create_consumer(settings)
    session = session_on(settings, consumer, repository, asyncio.Event())
    consumer.subscribe([topic], listener=session.rebalance_listener(asyncio.sleep))
    await consumer.start()
    try:
        fetched: list[Any] = []
        async with asyncio.timeout(30):
            while len(fetched) < 3:
                batch = await session.fetch(max_records=10)
                fetched.extend(record for records in batch.values() for record in records)
        [partition] = {(record.topic, record.partition) for record in fetched}
        last = max(record.offset for record in fetched)
        not_assigned = (settings.lifecycle_topic, 0)
        await session.commit({partition: last + 1, not_assigned: 7})
        assert await consumer.committed(TopicPartition(*partition)) == last + 1
        assert await consumer.committed(TopicPartition(*not_assigned)) is None
    finally:
        await consumer.stop()


async def test_a_database_refusal_is_permanent_and_not_retried(
    settings: Settings, repository: Repository, database_url: str
) -> None:
    session = session_on(settings, None, repository, asyncio.Event())
    calls = 0

    async def refused() -> None:
        nonlocal calls
        calls += 1
        connection = await asyncpg.connect(database_url)
        try:
            await connection.execute("SELECT 1 / 0")
        finally:
            await connection.close()

    with pytest.raises(PermanentDatabaseError) as raised:
        await session.retry_database(refused)
    assert isinstance(raised.value.cause, asyncpg.DivisionByZeroError)
    assert calls == 1


async def test_a_database_outage_is_retried_until_it_passes_and_stopping_ends_it(
    settings: Settings, repository: Repository
) -> None:
    stopping = asyncio.Event()
    session = session_on(settings, None, repository, stopping)
    failures = [ConnectionResetError(), ConnectionResetError()]

    async def flaky() -> str:
        if failures:
            raise failures.pop()
        return "written"

    assert await session.retry_database(flaky) == "written"

    async def down() -> None:
        stopping.set()
        raise ConnectionRefusedError

    with pytest.raises(Stopped):
        await session.retry_database(down)

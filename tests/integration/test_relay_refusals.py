"""The relay against a license events topic that refuses its messages for good: it says so
loudly (an error line and a metric), keeps every event in the outbox and keeps trying, so
that billing gets them once an operator fixes the topic. A license event is never dropped."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from tests.integration.license_support import ALICE, KIOSK, day, ingest, send
from tests.support import (
    Services,
    create_topics_with_limits,
    fetchval,
    make_settings,
    read_all,
    set_message_limit,
    wait_until,
)
from worker.db.repository import Repository
from worker.kafka.clients import create_producer
from worker.licensing.relay import Relay

pytestmark = pytest.mark.integration

PENDING = "SELECT count(*) FROM license_outbox WHERE published_at IS NULL"
KAFKA_DEFAULT_LIMIT = 1_048_588


def relay_failures(kind: str) -> float:
    value = REGISTRY.get_sample_value("license_worker_relay_failures_total", {"kind": kind})
    return value or 0.0


async def test_a_license_event_the_topic_refuses_is_logged_kept_and_sent_after_the_fix(
    services: Services, database_url: str
) -> None:
    topics = await create_topics_with_limits(services, license_events_limit=64)
    settings = make_settings(
        services, database_url, topics, sweep_enabled=False, relay_enabled=False
    )
    total = await send(services, settings, [(d, "install", day(0)) for d in (ALICE, KIOSK)])
    await ingest(services, settings, day(0), total)
    pending = await fetchval(database_url, PENDING)
    assert pending > 0
    repository = await Repository.connect(database_url, 2)
    producer = create_producer(settings)
    await producer.start()
    stopping = asyncio.Event()
    permanent_before = relay_failures("permanent")
    try:
        with capture_logs() as logs:
            task = asyncio.create_task(Relay(settings, repository, producer).run_forever(stopping))

            async def refused_twice() -> bool:
                return sum(line["event"] == "relay.refused" for line in logs) >= 2

            await wait_until(refused_twice, timeout=30)
            assert await fetchval(database_url, PENDING) == pending, "nothing marked or dropped"
            await set_message_limit(services, settings.license_events_topic, KAFKA_DEFAULT_LIMIT)

            async def all_published() -> bool:
                return await fetchval(database_url, PENDING) == 0

            await wait_until(all_published, timeout=30)
            stopping.set()
            await asyncio.wait_for(task, timeout=30)
    finally:
        stopping.set()
        await producer.stop()
        await repository.close()

    refusal = next(line for line in logs if line["event"] == "relay.refused")
    assert refusal["log_level"] == "error"
    assert refusal["error"] == "MessageSizeTooLargeError"
    assert refusal["topic"] == settings.license_events_topic
    assert relay_failures("permanent") >= permanent_before + 2
    published = await read_all(
        services.kafka_bootstrap_servers, settings.license_events_topic, pending, timeout=10
    )
    assert len(published) == pending

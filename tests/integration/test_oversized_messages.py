"""Messages at and above every size limit on the way to the DLQ, on the real broker.

The source topics accept messages of up to 3 MB (topic `max.message.bytes`); the worker's
producer sends at most 1 MiB per request (`max_request_size`). A dead letter whose copy does
not fit is written truncated, with the original's size and sha256; one the DLQ refuses even
truncated is logged and counted. Either way every partition keeps moving."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from tests.support import (
    Services,
    committed_offsets_total,
    create_topics_with_limits,
    encode,
    fetch,
    fetchval,
    make_settings,
    produce_to_partitions,
    read_all,
    running_worker,
    wait_until,
)
from worker.kafka.clients import PRODUCER_MAX_REQUEST_BYTES
from worker.sim.fleet import SimulatedDevice, agent_event

pytestmark = pytest.mark.integration

# Value sizes: a copy that fits whole, one whose dlq.* headers push it over the producer's
# limit, the producer's limit itself, and one above the broker's default limit.
FITS_WHOLE = 1_000_000
OVER_WITH_HEADERS = 1_048_500
AT_PRODUCER_LIMIT = PRODUCER_MAX_REQUEST_BYTES
ABOVE_BROKER_DEFAULT = 2_500_000
NOW = datetime.now(UTC).replace(microsecond=0)


def good(device_id: str) -> tuple[bytes, bytes]:
    device = SimulatedDevice("c1", device_id, None, "business")
    return device.key, encode(agent_event(device, "heartbeat", NOW))


def oversized(size: int) -> tuple[bytes, bytes]:
    return f"big-{size}".encode(), (b'{"pad":"' + b"p" * size)[:size]


async def ingest_until_committed(
    services: Services, topics: dict[str, str], expected: int, timeout: float = 60
) -> None:
    names = [topics["heartbeat_topic"], topics["lifecycle_topic"]]

    async def all_committed() -> bool:
        total = await committed_offsets_total(
            services.kafka_bootstrap_servers, topics["consumer_group"], names
        )
        return total >= expected

    await wait_until(all_committed, timeout=timeout)


async def stored_devices(database_url: str) -> set[str]:
    return {row["device_id"] for row in await fetch(database_url, "SELECT device_id FROM devices")}


def headers_of(record: Any) -> dict[str, str]:
    return {name: value.decode() for name, value in record.headers}


async def test_oversized_messages_are_dead_lettered_truncated_and_every_partition_moves(
    services: Services, database_url: str
) -> None:
    topics = await create_topics_with_limits(services, dlq_limit=None)
    big = [FITS_WHOLE, OVER_WITH_HEADERS, AT_PRODUCER_LIMIT, ABOVE_BROKER_DEFAULT]
    on_zero = [good("before")]
    for number, size in enumerate(big):
        on_zero += [oversized(size), good(f"after-{number}")]
    messages = {0: on_zero, **{p: [good(f"other-{p}")] for p in (1, 2, 3)}}
    topic = topics["heartbeat_topic"]
    total = await produce_to_partitions(services, topic, messages)
    settings = make_settings(services, database_url, topics, sweep_enabled=False)

    async with running_worker(settings):
        await ingest_until_committed(services, topics, total)

    expected = {"before", "other-1", "other-2", "other-3"} | {f"after-{n}" for n in range(4)}
    assert await stored_devices(database_url) == expected
    dead = await read_all(services.kafka_bootstrap_servers, topics["dlq_topic"], len(big))
    assert len(dead) == len(big)
    by_key = {record.key: record for record in dead}
    for number, size in enumerate(big):
        key, original = oversized(size)
        record, headers = by_key[key], headers_of(by_key[key])
        assert headers["dlq.error.class"] == "oversized"
        assert headers["dlq.source.topic"] == topic
        assert headers["dlq.source.partition"] == "0"
        assert int(headers["dlq.source.offset"]) == 1 + 2 * number
        if size == FITS_WHOLE:
            assert record.value == original, "a copy that fits is written whole"
            assert "dlq.truncated" not in headers
            continue
        assert headers["dlq.truncated"] == "true"
        assert headers["dlq.original_size"] == str(size)
        assert headers["dlq.original_sha256"] == hashlib.sha256(original).hexdigest()
        assert original.startswith(record.value), "the truncated value is the original's start"
        assert PRODUCER_MAX_REQUEST_BYTES - 4096 < len(record.value) < PRODUCER_MAX_REQUEST_BYTES


async def test_a_dead_letter_the_dlq_refuses_even_truncated_is_logged_and_ingestion_moves_on(
    services: Services, database_url: str
) -> None:
    topics = await create_topics_with_limits(services, dlq_limit=20_000)
    topic = topics["heartbeat_topic"]
    refused_key, refused_value = oversized(OVER_WITH_HEADERS)
    messages = {
        0: [good("before"), (refused_key, refused_value), (b"broken", b"{not json"), good("after")],
        1: [good("other-1")],
    }
    total = await produce_to_partitions(services, topic, messages)
    settings = make_settings(services, database_url, topics, sweep_enabled=False)
    labels = {"topic": topic, "reason": "oversized"}
    failed_before = REGISTRY.get_sample_value("license_worker_dead_letters_failed_total", labels)

    with capture_logs() as logs:
        async with running_worker(settings):
            await ingest_until_committed(services, topics, total)

    assert await stored_devices(database_url) == {"before", "after", "other-1"}
    [dead] = await read_all(services.kafka_bootstrap_servers, topics["dlq_topic"], 1, timeout=5)
    assert dead.key == b"broken", "the small dead letter still reaches the DLQ"
    [refusal] = [line for line in logs if line["event"] == "ingest.dead_letter_refused"]
    assert refusal["log_level"] == "error"
    assert refusal["source_topic"] == topic
    assert refusal["source_partition"] == 0
    assert refusal["source_offset"] == 1
    assert refusal["original_size"] == OVER_WITH_HEADERS
    assert refusal["original_sha256"] == hashlib.sha256(refused_value).hexdigest()
    assert refusal["error"] == "MessageSizeTooLargeError"
    failed = REGISTRY.get_sample_value("license_worker_dead_letters_failed_total", labels)
    assert failed == (failed_before or 0) + 1


SLOW_WRITE_OF_ONE_DEVICE = """
CREATE FUNCTION slow_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.device_id = 'slow' THEN
        PERFORM pg_sleep(12);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER slow_write BEFORE INSERT OR UPDATE ON devices
    FOR EACH ROW EXECUTE FUNCTION slow_write();
"""
SLEEPING = "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"


async def test_a_dead_letter_met_by_a_broker_outage_is_waited_for_never_dropped(
    services: Services, database_url: str
) -> None:
    """The batch's write is held in Postgres while the broker stops, so its dead letters are
    sent to a broker that is down: an outage, waited out (aiokafka holds the batch until
    the broker is back), never taken for a refusal."""
    connection = await asyncpg.connect(services.owner_url(database_url))
    try:
        await connection.execute(SLOW_WRITE_OF_ONE_DEVICE)
    finally:
        await connection.close()
    topics = await create_topics_with_limits(services)
    big_key, big_value = oversized(OVER_WITH_HEADERS)
    messages = {0: [good("slow"), (b"broken", b"{not json"), (big_key, big_value), good("after")]}
    total = await produce_to_partitions(services, topics["heartbeat_topic"], messages)
    settings = make_settings(services, database_url, topics, sweep_enabled=False)
    superuser = services.superuser_url(database_url)

    async def write_held() -> bool:
        return bool(await fetchval(superuser, SLEEPING))

    with capture_logs() as logs:
        async with running_worker(settings):
            await wait_until(write_held, timeout=30)
            await asyncio.to_thread(services.services_script, "stop-kafka")
            await asyncio.sleep(15)  # the write is done: the dead letters meet no broker
            await asyncio.to_thread(services.services_script, "start-kafka")
            await ingest_until_committed(services, topics, total, timeout=120)

    assert await stored_devices(database_url) == {"slow", "after"}
    dead = await read_all(services.kafka_bootstrap_servers, topics["dlq_topic"], 2)
    assert {record.key for record in dead} >= {b"broken", big_key}
    assert not [line for line in logs if line["event"] == "ingest.dead_letter_refused"]

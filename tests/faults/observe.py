"""Reads what the worker did: the rows it stored, the topics it wrote, the consumer group's
lag, Postgres's deadlock counter. Read-only, and tolerant of a service being away (a fault
may be in progress): a failed read returns None where noted."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from worker.kafka.clients import describe_partitions

# What a read may meet while Postgres restarts (a statement timeout leaves the connection
# unusable: InterfaceError).
UNAVAILABLE = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
STORED_TABLES = {
    "devices": "SELECT * FROM devices",
    "users": "SELECT * FROM users",
    "lifecycle": "SELECT * FROM device_lifecycle_events",
    "licenses": "SELECT * FROM licenses",
    "customers": "SELECT * FROM customers",
}


@dataclass(frozen=True, slots=True)
class Stored:
    devices: list[asyncpg.Record]
    users: list[asyncpg.Record]
    lifecycle: list[asyncpg.Record]
    licenses: list[asyncpg.Record]
    customers: list[asyncpg.Record]


@dataclass(frozen=True, slots=True)
class TopicRecord:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]


async def read_stored(superuser_url: str) -> Stored:
    connection = await asyncpg.connect(superuser_url)
    try:
        rows = {name: list(await connection.fetch(sql)) for name, sql in STORED_TABLES.items()}
    finally:
        await connection.close()
    return Stored(**rows)


async def fetch_value(url: str, sql: str, *args: Any) -> Any | None:
    """One value, or None if Postgres does not answer now."""
    try:
        connection = await asyncpg.connect(url, timeout=5)
    except UNAVAILABLE:
        return None
    try:
        return await connection.fetchval(sql, *args, timeout=10)
    except UNAVAILABLE:
        return None
    finally:
        connection.terminate()


async def stored_progress(url: str) -> int | None:
    """Messages stored so far: the sum of the next offsets recorded with the signals."""
    value = await fetch_value(url, "SELECT coalesce(sum(next_offset), 0) FROM ingestion_progress")
    return None if value is None else int(value)


async def deadlocks(superuser_url: str, database: str) -> int | None:
    value = await fetch_value(
        superuser_url, "SELECT deadlocks FROM pg_stat_database WHERE datname = $1", database
    )
    return None if value is None else int(value)


async def pending_outbox(url: str) -> int | None:
    value = await fetch_value(url, "SELECT count(*) FROM license_outbox WHERE published_at IS NULL")
    return None if value is None else int(value)


class LagReader:
    """Consumer lag of a group: the topics' end offsets against the group's committed
    offsets. One set of clients for the whole run (they reconnect after a broker restart)."""

    def __init__(self, bootstrap: str) -> None:
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)

    async def start(self) -> None:
        await self._admin.start()
        await _start(self._consumer)

    async def stop(self) -> None:
        await self._consumer.stop()
        await self._admin.close()

    async def lag(self, group: str, topics: Sequence[str]) -> dict[str, int] | None:
        """Messages not committed yet, per partition ("topic[p]"); None if Kafka does not
        answer now."""
        try:
            partitions = await describe_partitions(self._admin, list(topics))
            ends = await self._consumer.end_offsets(partitions)
            committed = await self._admin.list_consumer_group_offsets(group)
        except (KafkaError, OSError):
            return None
        lag = {}
        for partition, end in ends.items():
            meta = committed.get(partition)
            done = meta.offset if meta is not None and meta.offset >= 0 else 0
            lag[f"{partition.topic}[{partition.partition}]"] = max(end - done, 0)
        return lag


async def read_topic(bootstrap: str, topic: str) -> list[TopicRecord]:
    """Every record of `topic`, from the beginning to its current end."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        partitions = await describe_partitions(admin, [topic])
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4_194_304,
        fetch_max_bytes=16_777_216,
    )
    await _start(consumer)
    try:
        ends = await consumer.end_offsets(partitions)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        return await _read_until(consumer, ends)
    finally:
        await consumer.stop()


async def _start(consumer: AIOKafkaConsumer) -> None:
    await consumer.start()
    # Lets the consumer's background task begin: stopped before that, aiokafka's stop()
    # raises CancelledError from it.
    await asyncio.sleep(0.1)


async def _read_until(consumer: Any, ends: dict[TopicPartition, int]) -> list[TopicRecord]:
    records: list[TopicRecord] = []
    waiting = {tp for tp, end in ends.items() if end > 0}
    while waiting:
        batch = await consumer.getmany(timeout_ms=1000)
        for tp, partition_records in batch.items():
            records.extend(_record(tp.partition, record) for record in partition_records)
            if await consumer.position(tp) >= ends[tp]:
                waiting.discard(tp)
        for tp in list(waiting):
            if await consumer.position(tp) >= ends[tp]:
                waiting.discard(tp)
    return records


def _record(partition: int, record: Any) -> TopicRecord:
    headers = {name: bytes(value) for name, value in record.headers or ()}
    return TopicRecord(partition, record.offset, record.key, record.value, headers)


def newest_by_key(rows: Iterable[asyncpg.Record], *columns: str) -> dict[tuple[Any, ...], Any]:
    return {tuple(row[column] for column in columns): row for row in rows}

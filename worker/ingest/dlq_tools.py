"""Reading the DLQ for operators (`license-worker dlq inspect`) and sending messages back
to their source topic once the cause is fixed (`license-worker dlq replay`)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from worker.ingest.dead_letters import HEADER_PREFIX
from worker.kafka.clients import create_producer, read_until_end, start_once
from worker.settings import Settings

REPLAYED_FROM_HEADER = "dlq.replayed_from"


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, str]
    original_headers: list[tuple[str, bytes]]

    @property
    def reason(self) -> str:
        return self.headers.get("error.class", "unknown")

    @property
    def source_topic(self) -> str | None:
        return self.headers.get("source.topic")

    @property
    def truncated(self) -> bool:
        """The value is only the original's start: the whole message is at `source`."""
        return self.headers.get("truncated") == "true"

    @property
    def source(self) -> str:
        partition, offset = self.headers.get("source.partition"), self.headers.get("source.offset")
        return f"{self.source_topic}[{partition}]@{offset}"


@dataclass
class Inspection:
    total: int = 0
    truncated: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    by_source: Counter[str] = field(default_factory=Counter)
    samples: dict[str, list[DeadLetterRecord]] = field(default_factory=lambda: defaultdict(list))


def to_record(record: Any) -> DeadLetterRecord:
    ours, original = {}, []
    for name, value in record.headers or ():
        if name.startswith(HEADER_PREFIX):
            ours[name.removeprefix(HEADER_PREFIX)] = value.decode("utf-8", "replace")
        else:
            original.append((name, value))
    return DeadLetterRecord(
        record.partition, record.offset, record.key, record.value, ours, original
    )


def inspect(records: Iterable[DeadLetterRecord], samples_per_reason: int) -> Inspection:
    inspection = Inspection()
    for record in records:
        inspection.total += 1
        inspection.truncated += record.truncated
        inspection.by_reason[record.reason] += 1
        inspection.by_source[record.source_topic or "unknown"] += 1
        if len(inspection.samples[record.reason]) < samples_per_reason:
            inspection.samples[record.reason].append(record)
    return inspection


def selected(record: DeadLetterRecord, reasons: set[str], source_topics: set[str]) -> bool:
    return (not reasons or record.reason in reasons) and (
        not source_topics or record.source_topic in source_topics
    )


def split_truncated(
    records: Iterable[DeadLetterRecord],
) -> tuple[list[DeadLetterRecord], list[DeadLetterRecord]]:
    """The records replay may send, and the truncated ones it must not: their value is cut,
    so sending it would inject a broken message; the original is in the source topic."""
    whole: list[DeadLetterRecord] = []
    truncated: list[DeadLetterRecord] = []
    for record in records:
        (truncated if record.truncated else whole).append(record)
    return whole, truncated


async def read_dead_letters(settings: Settings) -> AsyncIterator[DeadLetterRecord]:
    """Every message in the DLQ up to its end when the read started (no consumer group, so
    reading changes nothing)."""
    async for record in read_until_end(settings, settings.dlq_topic):
        yield to_record(record)


async def replay(
    settings: Settings,
    records: Iterable[DeadLetterRecord],
    on_sent: Callable[[DeadLetterRecord], None] = lambda record: None,
) -> int:
    """Sends each message back to its source topic: key, value and original headers
    unchanged, plus where it came from in the DLQ. Ingestion is idempotent, so a message
    replayed twice changes nothing the second time. Truncated dead letters are never sent
    (see `split_truncated`)."""
    producer = create_producer(settings)
    sent = 0
    try:
        await start_once("kafka-producer", producer.start, settings)
        for record in records:
            if record.source_topic is None or record.truncated:
                continue
            headers = [
                *record.original_headers,
                (
                    REPLAYED_FROM_HEADER,
                    f"{settings.dlq_topic}:{record.partition}:{record.offset}".encode(),
                ),
            ]
            await producer.send_and_wait(
                record.source_topic, value=record.value, key=record.key, headers=headers
            )
            sent += 1
            on_sent(record)
    finally:
        await producer.stop()
    return sent

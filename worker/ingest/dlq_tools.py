"""Reading the DLQ for operators (`license-worker dlq inspect`) and sending messages back
to their source topic once the cause is fixed (`license-worker dlq replay`).

Both stream the DLQ: records are counted or sent as they are read, so memory stays bounded
however large the DLQ is. Whoever can write to the DLQ can forge its headers, so what a
record says is treated as input: replay writes only to the agent and console topics, and the
counts keep a bounded number of distinct names."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from worker.ingest.dead_letters import HEADER_PREFIX
from worker.kafka.clients import create_producer, read_until_end, start_once
from worker.settings import Settings

REPLAYED_FROM_HEADER = "dlq.replayed_from"
# Distinct reasons or topic names counted one by one; the rest under OTHER (a forged DLQ
# could name a million).
MAX_DISTINCT_NAMES = 100
OTHER = "(other)"
MAX_NAME_CHARS = 200
# Of a sample's value and headers, kept for its preview.
SAMPLE_VALUE_BYTES = 1024
SAMPLE_HEADERS = (
    "error.class",
    "error.message",
    "source.topic",
    "source.partition",
    "source.offset",
    "failed_at",
    "truncated",
    "original_size",
    "original_sha256",
)
# Truncated dead letters whose source is listed; the rest are counted.
MAX_LISTED_TRUNCATED = 50
# Sends not yet acknowledged, by count and by bytes (a dead letter may be 1 MiB): the
# producer's memory, and what a failure leaves unconfirmed.
MAX_IN_FLIGHT = 100
MAX_IN_FLIGHT_BYTES = 4_194_304


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, str]
    original_headers: list[tuple[str, bytes]]
    # The value's length as read (a sample keeps only the value's start).
    size: int = 0

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
    samples_per_reason: int = 3

    def add(self, record: DeadLetterRecord) -> None:
        self.total += 1
        self.truncated += record.truncated
        reason = count_name(self.by_reason, record.reason)
        count_name(self.by_source, record.source_topic or "unknown")
        if len(self.samples[reason]) < self.samples_per_reason:
            self.samples[reason].append(as_sample(record))


def count_name(counter: Counter[str], name: str) -> str:
    """Counts `name` (its first MAX_NAME_CHARS), or OTHER once MAX_DISTINCT_NAMES are
    counted; returns which."""
    name = name[:MAX_NAME_CHARS]
    if name not in counter and len(counter) >= MAX_DISTINCT_NAMES:
        name = OTHER
    counter[name] += 1
    return name


def as_sample(record: DeadLetterRecord) -> DeadLetterRecord:
    """The record cut to what a preview shows: the start of its value and of our headers;
    the original headers left out."""
    return replace(
        record,
        key=record.key[:SAMPLE_VALUE_BYTES] if record.key is not None else None,
        value=record.value[:SAMPLE_VALUE_BYTES] if record.value is not None else None,
        headers={
            name: record.headers[name][:SAMPLE_VALUE_BYTES]
            for name in SAMPLE_HEADERS
            if name in record.headers
        },
        original_headers=[],
    )


def to_record(record: Any) -> DeadLetterRecord:
    ours, original = {}, []
    for name, value in record.headers or ():
        if name.startswith(HEADER_PREFIX):
            ours[name.removeprefix(HEADER_PREFIX)] = value.decode("utf-8", "replace")
        else:
            original.append((name, value))
    size = len(record.value) if record.value is not None else 0
    return DeadLetterRecord(
        record.partition, record.offset, record.key, record.value, ours, original, size
    )


def inspect(records: Iterable[DeadLetterRecord], samples_per_reason: int) -> Inspection:
    inspection = Inspection(samples_per_reason=samples_per_reason)
    for record in records:
        inspection.add(record)
    return inspection


async def inspect_dead_letters(settings: Settings, samples_per_reason: int) -> Inspection:
    """Counts the whole DLQ as it is read: only the samples are kept."""
    inspection = Inspection(samples_per_reason=samples_per_reason)
    async for record in read_dead_letters(settings):
        inspection.add(record)
    return inspection


def selected(record: DeadLetterRecord, reasons: set[str], source_topics: set[str]) -> bool:
    return (not reasons or record.reason in reasons) and (
        not source_topics or record.source_topic in source_topics
    )


def replay_topics(settings: Settings) -> frozenset[str]:
    """The only topics replay writes to: where agents and the console write. Never the
    license events (billing reads them as the worker's own word), the DLQ, or anything
    else a header may name."""
    return frozenset({*settings.agent_topics, settings.admin_topic})


@dataclass
class ReplayReport:
    sent: int = 0  # or, in a dry run, would be sent
    truncated: int = 0
    # The sources of the first MAX_LISTED_TRUNCATED truncated ones, to fetch by hand.
    truncated_sources: list[str] = field(default_factory=list)
    # Dead letters naming a topic replay never writes to, by that name.
    foreign_topics: Counter[str] = field(default_factory=Counter)

    @property
    def foreign(self) -> int:
        return sum(self.foreign_topics.values())

    def skip_truncated(self, record: DeadLetterRecord) -> None:
        self.truncated += 1
        if len(self.truncated_sources) < MAX_LISTED_TRUNCATED:
            self.truncated_sources.append(truncation_note(record))


def truncation_note(record: DeadLetterRecord) -> str:
    return (
        f"truncated: the original is {record.source}, {record.headers.get('original_size')} "
        f"bytes, sha256 {record.headers.get('original_sha256')}"
    )


async def read_dead_letters(settings: Settings) -> AsyncIterator[DeadLetterRecord]:
    """Every message in the DLQ up to its end when the read started (no consumer group, so
    reading changes nothing)."""
    async for record in read_until_end(settings, settings.dlq_topic):
        yield to_record(record)


async def replay_dead_letters(
    settings: Settings,
    reasons: Iterable[str] = (),
    source_topics: Iterable[str] = (),
    *,
    dry_run: bool = False,
    on_sent: Callable[[DeadLetterRecord], None] = lambda record: None,
) -> ReplayReport:
    """Reads the DLQ and replays the chosen records as it goes (see `replay`)."""
    wanted_reasons, wanted_topics = set(reasons), set(source_topics)
    chosen = (
        record
        async for record in read_dead_letters(settings)
        if selected(record, wanted_reasons, wanted_topics)
    )
    return await replay(settings, chosen, dry_run=dry_run, on_sent=on_sent)


async def replay(
    settings: Settings,
    records: AsyncIterable[DeadLetterRecord],
    *,
    dry_run: bool = False,
    on_sent: Callable[[DeadLetterRecord], None] = lambda record: None,
    max_in_flight: int = MAX_IN_FLIGHT,
) -> ReplayReport:
    """Sends each message back to its source topic as it is read: key, value and original
    headers unchanged, plus where it came from in the DLQ. At most `max_in_flight` sends
    wait for the broker's answer; `on_sent` is called for each acknowledged one, in order.
    Ingestion is idempotent, so a message replayed twice changes nothing the second time.

    Skipped and counted, never sent: truncated dead letters (their value is cut, so sending
    it would inject a broken message; the whole one is in the source topic), and any naming
    a topic outside `replay_topics` (a forged header, or a topic renamed since)."""
    report = ReplayReport()
    allowed = replay_topics(settings)
    producer = None if dry_run else create_producer(settings)
    in_flight: deque[tuple[DeadLetterRecord, asyncio.Future[Any]]] = deque()
    in_flight_bytes = 0

    async def settle_oldest() -> None:
        nonlocal in_flight_bytes
        record, delivery = in_flight.popleft()
        await delivery
        in_flight_bytes -= record.size
        report.sent += 1
        on_sent(record)

    try:
        if producer is not None:
            await start_once("kafka-producer", producer.start, settings)
        async for record in records:
            topic = record.source_topic or ""
            if record.truncated:
                report.skip_truncated(record)
            elif topic not in allowed:
                count_name(report.foreign_topics, topic or "(none)")
            elif producer is None:
                report.sent += 1
            else:
                while in_flight and (
                    len(in_flight) >= max_in_flight or in_flight_bytes >= MAX_IN_FLIGHT_BYTES
                ):
                    await settle_oldest()
                in_flight.append((record, await _send_back(producer, settings, topic, record)))
                in_flight_bytes += record.size
        while in_flight:
            await settle_oldest()
    finally:
        await _abandon(in_flight)
        if producer is not None:
            await producer.stop()
    return report


async def _send_back(
    producer: Any, settings: Settings, topic: str, record: DeadLetterRecord
) -> Any:
    """Queues the record for `topic`; returns the broker's answer to await."""
    replayed_from = f"{settings.dlq_topic}:{record.partition}:{record.offset}"
    headers = [*record.original_headers, (REPLAYED_FROM_HEADER, replayed_from.encode())]
    return await producer.send(topic, value=record.value, key=record.key, headers=headers)


async def _abandon(in_flight: deque[tuple[DeadLetterRecord, asyncio.Future[Any]]]) -> None:
    """After a failed send, the answers still awaited: collected so none is left unread."""
    await asyncio.gather(*(delivery for _, delivery in in_flight), return_exceptions=True)

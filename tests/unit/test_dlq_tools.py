"""`worker.ingest.dlq_tools`: truncated dead letters are told apart, counted and never
replayed; replay streams with bounded sends in flight and writes only to the agent and
console topics; inspection keeps bounded counts and samples of a hostile DLQ."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from types import SimpleNamespace
from typing import Any

import pytest

from worker.ingest import dlq_tools
from worker.ingest.dlq_tools import (
    MAX_DISTINCT_NAMES,
    OTHER,
    SAMPLE_VALUE_BYTES,
    DeadLetterRecord,
    inspect,
    replay,
    to_record,
)
from worker.settings import Settings

SETTINGS = Settings()


def dead_letter(
    offset: int,
    *extra: tuple[str, bytes],
    topic: str = "agent.heartbeat.v1",
    reason: str = "oversized",
    value: bytes = b"v",
) -> DeadLetterRecord:
    headers = [
        ("trace", b"1"),
        ("dlq.error.class", reason.encode()),
        ("dlq.source.topic", topic.encode()),
        ("dlq.source.partition", b"2"),
        ("dlq.source.offset", str(offset).encode()),
        *extra,
    ]
    record = SimpleNamespace(partition=0, offset=offset, key=b"k", value=value, headers=headers)
    return to_record(record)


TRUNCATION = (
    ("dlq.truncated", b"true"),
    ("dlq.original_size", b"2500000"),
    ("dlq.original_sha256", b"ab" * 32),
)


def test_a_truncated_dead_letter_is_recognised_by_its_header() -> None:
    truncated = dead_letter(7, *TRUNCATION)
    assert truncated.truncated
    assert truncated.source == "agent.heartbeat.v1[2]@7"
    assert truncated.original_headers == [("trace", b"1")]
    assert not dead_letter(8).truncated
    assert not dead_letter(9, ("dlq.truncated", b"false")).truncated


async def stream(records: Iterable[DeadLetterRecord]) -> AsyncIterator[DeadLetterRecord]:
    for record in records:
        yield record


async def test_a_dry_run_counts_and_skips_the_truncated_and_the_foreign() -> None:
    records = [
        dead_letter(1),
        dead_letter(2, *TRUNCATION),
        dead_letter(3, topic=SETTINGS.license_events_topic),
        dead_letter(4, topic=SETTINGS.admin_topic),
        dead_letter(5, topic=SETTINGS.dlq_topic),
        dead_letter(6, topic=SETTINGS.lifecycle_topic),
    ]
    report = await replay(SETTINGS, stream(records), dry_run=True)
    assert report.sent == 3
    assert report.truncated == 1
    assert report.truncated_sources == [
        f"truncated: the original is agent.heartbeat.v1[2]@2, 2500000 bytes, sha256 {'ab' * 32}"
    ]
    assert report.foreign_topics == {SETTINGS.license_events_topic: 1, SETTINGS.dlq_topic: 1}


class SlowBroker:
    """A producer whose broker acknowledges one send per tick, oldest first."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []
        self.unanswered: list[asyncio.Future[None]] = []
        self.most_unanswered = 0
        self.fail_at: int | None = None

    async def start(self) -> None:
        self._answering = asyncio.create_task(self._answer())

    async def stop(self) -> None:
        self._answering.cancel()

    async def send(self, topic: str, **message: Any) -> asyncio.Future[None]:
        self.sent.append((topic, len(self.sent)))
        delivery: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.unanswered.append(delivery)
        self.most_unanswered = max(self.most_unanswered, len(self.unanswered))
        return delivery

    async def _answer(self) -> None:
        while True:
            await asyncio.sleep(0.001)
            if self.unanswered:
                delivery = self.unanswered.pop(0)
                if self.fail_at is not None and len(self.sent) > self.fail_at:
                    delivery.set_exception(RuntimeError("broker refused"))
                else:
                    delivery.set_result(None)


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> SlowBroker:
    producer = SlowBroker()

    async def start_once(name: str, start: Any, settings: Settings) -> None:
        await start()

    monkeypatch.setattr(dlq_tools, "create_producer", lambda settings: producer)
    monkeypatch.setattr(dlq_tools, "start_once", start_once)
    return producer


async def test_replay_sends_as_it_reads_with_bounded_sends_in_flight(broker: SlowBroker) -> None:
    read = 0
    read_when_acknowledged: list[int] = []

    async def dlq() -> AsyncIterator[DeadLetterRecord]:
        nonlocal read
        for offset in range(200):
            read += 1
            yield dead_letter(offset)

    report = await replay(
        SETTINGS,
        dlq(),
        max_in_flight=5,
        on_sent=lambda record: read_when_acknowledged.append(read),
    )
    assert report.sent == 200
    assert broker.most_unanswered == 5, "the bound is reached, never passed"
    assert read_when_acknowledged[0] <= 6, "the first is acknowledged long before the end"
    assert [offset for _, offset in broker.sent] == list(range(200))


async def test_a_failed_send_stops_the_replay_and_leaves_no_answer_unread(
    broker: SlowBroker,
) -> None:
    broker.fail_at = 10
    with pytest.raises(RuntimeError, match="broker refused"):
        await replay(SETTINGS, stream([dead_letter(n) for n in range(100)]), max_in_flight=5)
    assert len(broker.sent) < 20


def test_inspection_of_a_hostile_dlq_keeps_bounded_names_and_samples() -> None:
    big = b"x" * (SAMPLE_VALUE_BYTES * 10)
    records = [dead_letter(n, reason=f"reason-{n}", topic=f"t-{n}", value=big) for n in range(300)]
    report = inspect(records, samples_per_reason=3)
    assert report.total == 300
    assert len(report.by_reason) == MAX_DISTINCT_NAMES + 1
    assert report.by_reason[OTHER] == 300 - MAX_DISTINCT_NAMES
    assert len(report.by_source) == MAX_DISTINCT_NAMES + 1
    assert len(report.samples[OTHER]) == 3
    sample = report.samples["reason-0"][0]
    assert sample.value == big[:SAMPLE_VALUE_BYTES]
    assert sample.size == len(big)
    assert sample.original_headers == []
    assert sample.source == "t-0[2]@0"


def test_a_huge_forged_header_is_cut_in_counts_and_samples() -> None:
    huge = "r" * 100_000
    report = inspect([dead_letter(1, reason=huge)], samples_per_reason=3)
    [(reason, count)] = report.by_reason.items()
    assert (len(reason), count) == (200, 1)
    assert len(report.samples[reason][0].headers["error.class"]) == SAMPLE_VALUE_BYTES


def test_inspect_counts_the_truncated() -> None:
    report = inspect([dead_letter(1), dead_letter(2, *TRUNCATION)], samples_per_reason=3)
    assert report.total == 2
    assert report.truncated == 1
    assert report.by_reason == {"oversized": 2}

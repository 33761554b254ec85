"""`worker.dead_letters`: the DLQ copy of a message, bytes unchanged and the reason in headers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from worker.dead_letters import DeadLetter, dead_letter_headers, publish_dead_letters
from worker.decoding import Rejection, RejectReason

FAILED_AT = datetime(2026, 11, 28, 17, 0, 1, 250_000, tzinfo=UTC)
OUR_NAMES = [
    "dlq.error.class",
    "dlq.error.message",
    "dlq.source.topic",
    "dlq.source.partition",
    "dlq.source.offset",
    "dlq.failed_at",
]


def letter(
    headers: Sequence[tuple[str, bytes]] = (),
    rejection: Rejection | None = None,
    *,
    partition: int = 3,
    offset: int = 1234,
) -> DeadLetter:
    return DeadLetter(
        topic="agent.heartbeat.v1",
        partition=partition,
        offset=offset,
        key=b"cust-042:dev-7f3a",
        value=b"{not json",
        headers=headers,
        rejection=rejection or Rejection(RejectReason.INVALID_JSON, "unexpected end of data"),
    )


def test_headers_of_a_message_without_headers() -> None:
    assert dead_letter_headers(letter(), FAILED_AT) == [
        ("dlq.error.class", b"invalid_json"),
        ("dlq.error.message", b"unexpected end of data"),
        ("dlq.source.topic", b"agent.heartbeat.v1"),
        ("dlq.source.partition", b"3"),
        ("dlq.source.offset", b"1234"),
        ("dlq.failed_at", b"2026-11-28T17:00:01.250000+00:00"),
    ]


@pytest.mark.parametrize(
    ("incoming", "kept"),
    [
        pytest.param(
            [("traceparent", b"00-abc-01"), ("agent", b"5.3.1")],
            [("traceparent", b"00-abc-01"), ("agent", b"5.3.1")],
            id="originals-kept-in-order",
        ),
        pytest.param(
            [("dlq.error.class", b"old"), ("x", b"1"), ("dlq.attempt", b"2")],
            [("x", b"1")],
            id="incoming-dlq-headers-replaced",
        ),
        pytest.param(
            [("dlqx", b"1"), ("DLQ.error.class", b"2"), ("my.dlq.note", b"3")],
            [("dlqx", b"1"), ("DLQ.error.class", b"2"), ("my.dlq.note", b"3")],
            id="only-the-exact-prefix-is-ours",
        ),
        pytest.param(
            [("dup", b"1"), ("dup", b"2"), ("empty", b"")],
            [("dup", b"1"), ("dup", b"2"), ("empty", b"")],
            id="repeated-and-empty-kept",
        ),
    ],
)
def test_original_headers_then_ours(
    incoming: list[tuple[str, bytes]], kept: list[tuple[str, bytes]]
) -> None:
    headers = dead_letter_headers(letter(incoming), FAILED_AT)
    assert headers[: len(kept)] == kept
    assert [name for name, _ in headers[len(kept) :]] == OUR_NAMES


def test_a_message_dead_lettered_twice_carries_only_the_latest_reason() -> None:
    first = dead_letter_headers(letter(), FAILED_AT)
    second_rejection = Rejection(RejectReason.SCHEMA_VIOLATION, "heartbeat.device_id: required")
    later = FAILED_AT + timedelta(hours=1)
    second = dict(dead_letter_headers(letter(first, second_rejection, offset=7), later))
    assert [name for name, _ in dead_letter_headers(letter(first), later)] == OUR_NAMES
    assert second["dlq.error.class"] == b"schema_violation"
    assert second["dlq.source.offset"] == b"7"
    assert second["dlq.failed_at"] == later.isoformat().encode()


@pytest.mark.parametrize("reason", list(RejectReason))
def test_error_class_is_the_reason_label(reason: RejectReason) -> None:
    headers = dict(dead_letter_headers(letter(rejection=Rejection(reason, "d")), FAILED_AT))
    assert headers["dlq.error.class"] == reason.value.encode("ascii")


def test_values_are_utf8_bytes() -> None:
    rejection = Rejection(RejectReason.SCHEMA_VIOLATION, "hôte: caractère interdit ✗")
    headers = dead_letter_headers(letter(rejection=rejection), FAILED_AT)
    assert all(isinstance(value, bytes) for _, value in headers)
    assert dict(headers)["dlq.error.message"] == "hôte: caractère interdit ✗".encode()


@pytest.mark.parametrize(("partition", "offset"), [(0, 0), (11, 2**40), (2**31 - 1, 2**63 - 1)])
def test_partition_and_offset_are_decimal_text(partition: int, offset: int) -> None:
    headers = dict(dead_letter_headers(letter(partition=partition, offset=offset), FAILED_AT))
    assert headers["dlq.source.partition"] == str(partition).encode()
    assert headers["dlq.source.offset"] == str(offset).encode()


def test_failed_at_keeps_its_offset() -> None:
    failed_at = datetime(2026, 11, 28, 18, 0, tzinfo=timezone(timedelta(hours=1)))
    headers = dict(dead_letter_headers(letter(), failed_at))
    assert headers["dlq.failed_at"] == b"2026-11-28T18:00:00+01:00"
    assert datetime.fromisoformat(headers["dlq.failed_at"].decode()) == failed_at


def test_headers_do_not_mutate_the_letter() -> None:
    original = [("trace", b"1"), ("dlq.error.class", b"old")]
    dead = letter(list(original))
    dead_letter_headers(dead, FAILED_AT)
    assert list(dead.headers) == original


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.acknowledged = 0

    async def send(self, topic: str, **message: Any) -> asyncio.Future[None]:
        self.sent.append({"topic": topic, **message})
        delivery: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(self._acknowledge, delivery)
        return delivery

    def _acknowledge(self, delivery: asyncio.Future[None]) -> None:
        self.acknowledged += 1
        delivery.set_result(None)


async def test_publish_sends_bytes_unchanged_and_waits_for_every_acknowledgement() -> None:
    producer = FakeProducer()
    letters = [letter([("trace", b"1")], offset=1), letter(offset=2)]
    await publish_dead_letters(producer, "agent.events.dlq.v1", letters, FAILED_AT)
    assert producer.acknowledged == 2
    assert [message["topic"] for message in producer.sent] == ["agent.events.dlq.v1"] * 2
    for message, dead in zip(producer.sent, letters, strict=True):
        assert message["value"] == dead.value
        assert message["key"] == dead.key
        assert message["headers"] == dead_letter_headers(dead, FAILED_AT)


async def test_publish_nothing() -> None:
    producer = FakeProducer()
    await publish_dead_letters(producer, "dlq", [], FAILED_AT)
    assert producer.sent == []

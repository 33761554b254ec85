"""`worker.ingest.dead_letters`: the DLQ copy of a message, bytes unchanged, reason in headers."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    TopicAuthorizationFailedError,
)

from worker.ingest.dead_letters import (
    TRUNCATION_MARGIN_BYTES,
    DeadLetter,
    DeadLetterCopy,
    dead_letter_headers,
    publish_dead_letters,
    truncated_copy,
    whole_copy,
)
from worker.ingest.decoding import Rejection, RejectReason

FAILED_AT = datetime(2026, 11, 28, 17, 0, 1, 250_000, tzinfo=UTC)
LIMIT = 1_048_576
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
    value: bytes | None = b"{not json",
    key: bytes | None = b"cust-042:dev-7f3a",
) -> DeadLetter:
    return DeadLetter(
        topic="agent.heartbeat.v1",
        partition=partition,
        offset=offset,
        key=key,
        value=value,
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
    report = await publish_dead_letters(producer, "agent.events.dlq.v1", letters, FAILED_AT, LIMIT)
    assert producer.acknowledged == 2
    assert report.refused == report.pending == []
    assert report.transient_error is None
    assert [message["topic"] for message in producer.sent] == ["agent.events.dlq.v1"] * 2
    for message, dead in zip(producer.sent, letters, strict=True):
        assert message["value"] == dead.value
        assert message["key"] == dead.key
        assert message["headers"] == dead_letter_headers(dead, FAILED_AT)


async def test_publish_nothing() -> None:
    producer = FakeProducer()
    await publish_dead_letters(producer, "dlq", [], FAILED_AT, LIMIT)
    assert producer.sent == []


def copy_headers(copy: DeadLetterCopy) -> dict[str, bytes]:
    return dict(copy.headers)


def test_a_copy_that_fits_is_not_truncated() -> None:
    dead = letter([("trace", b"1")])
    assert truncated_copy(dead, FAILED_AT, LIMIT) == whole_copy(dead, FAILED_AT)


@pytest.mark.parametrize("size", [LIMIT - 200, LIMIT, 3 * LIMIT])
def test_a_large_value_is_cut_to_fit_and_marked(size: int) -> None:
    value = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    dead = letter([("trace", b"1")], value=value)
    copy = truncated_copy(dead, FAILED_AT, LIMIT)
    headers = copy_headers(copy)
    assert LIMIT - TRUNCATION_MARGIN_BYTES - 64 < copy.size <= LIMIT - TRUNCATION_MARGIN_BYTES
    assert copy.value is not None
    assert value.startswith(copy.value)
    assert copy.key == dead.key
    assert headers["trace"] == b"1", "original headers kept while they fit"
    assert headers["dlq.source.offset"] == b"1234"
    assert headers["dlq.truncated"] == b"true"
    assert headers["dlq.original_size"] == str(size).encode()
    assert headers["dlq.original_sha256"] == hashlib.sha256(value).hexdigest().encode()


def test_original_headers_too_large_to_keep_are_left_out() -> None:
    dead = letter([("huge", b"h" * LIMIT)], value=b"v" * 1000)
    copy = truncated_copy(dead, FAILED_AT, LIMIT)
    assert [name for name, _ in copy.headers if not name.startswith("dlq.")] == []
    assert copy.value == b"v" * 1000
    assert copy.key == dead.key
    assert copy_headers(copy)["dlq.truncated"] == b"true"


def test_a_key_too_large_to_keep_is_left_out() -> None:
    dead = letter(key=b"k" * LIMIT, value=b"v" * 1000)
    copy = truncated_copy(dead, FAILED_AT, LIMIT)
    assert copy.key is None
    assert copy.value == b"v" * 1000
    assert copy_headers(copy)["dlq.original_size"] == b"1000"


def test_a_truncated_copy_is_never_larger_than_the_limit_even_with_a_tiny_limit() -> None:
    copy = truncated_copy(letter(value=b"v" * 5000), FAILED_AT, TRUNCATION_MARGIN_BYTES + 100)
    assert copy.key is None
    assert copy.value == b""
    assert copy_headers(copy)["dlq.original_size"] == b"5000"


class RefusingProducer(FakeProducer):
    """Refuses a message when `at_send` or `at_delivery` returns an error for it, the way
    aiokafka does: its own size check raises from `send`, the broker's answer fails the
    delivery."""

    def __init__(
        self,
        at_send: Any = lambda message: None,
        at_delivery: Any = lambda message: None,
    ) -> None:
        super().__init__()
        self._at_send = at_send
        self._at_delivery = at_delivery

    async def send(self, topic: str, **message: Any) -> asyncio.Future[None]:
        error = self._at_send(message)
        if error is not None:
            self.sent.append({"topic": topic, **message})
            raise error
        error = self._at_delivery(message)
        if error is None:
            return await super().send(topic, **message)
        self.sent.append({"topic": topic, **message})
        refused: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        refused.set_exception(error)
        return refused


def larger_than(limit: int, error: KafkaError) -> Any:
    def check(message: dict[str, Any]) -> KafkaError | None:
        copy = DeadLetterCopy(message["key"], message["value"], message["headers"])
        return error if copy.size > limit else None

    return check


def truncated(message: dict[str, Any]) -> bool:
    return ("dlq.truncated", b"true") in message["headers"]


async def test_a_letter_too_large_for_the_producer_goes_again_truncated_and_alone() -> None:
    producer = RefusingProducer(at_send=larger_than(LIMIT, MessageSizeTooLargeError()))
    big, small = letter(value=b"b" * LIMIT, offset=1), letter(offset=2)
    report = await publish_dead_letters(producer, "dlq", [big, small], FAILED_AT, LIMIT)
    assert report.refused == report.pending == []
    assert [truncated(m) for m in producer.sent] == [False, False, True]
    assert producer.sent[1]["value"] == small.value
    assert producer.acknowledged == 2


async def test_a_letter_the_dlq_refuses_even_truncated_is_reported_refused() -> None:
    error = MessageSizeTooLargeError()  # the broker's: the DLQ topic's max.message.bytes
    producer = RefusingProducer(at_delivery=larger_than(20_000, error))
    big, small = letter(value=b"b" * 60_000, offset=1), letter(offset=2)
    report = await publish_dead_letters(producer, "dlq", [big, small], FAILED_AT, LIMIT)
    assert [(r.letter, r.error) for r in report.refused] == [(big, error)]
    assert report.pending == []
    assert report.transient_error is None
    assert len(producer.sent) == 3, "whole, then alone (fits the producer: not cut)"


async def test_an_authorisation_refusal_is_reported_without_a_truncated_attempt() -> None:
    error = TopicAuthorizationFailedError()
    producer = RefusingProducer(at_delivery=lambda message: error)
    dead = letter()
    report = await publish_dead_letters(producer, "dlq", [dead], FAILED_AT, LIMIT)
    assert [(r.letter, r.error) for r in report.refused] == [(dead, error)]
    assert len(producer.sent) == 1


def refuse_key_b(error: KafkaError) -> Any:
    return lambda message: error if message["key"] == b"b" else None


@pytest.mark.parametrize(
    "producer",
    [
        RefusingProducer(at_send=refuse_key_b(KafkaTimeoutError())),
        RefusingProducer(at_delivery=refuse_key_b(KafkaConnectionError())),
    ],
    ids=["not-queued", "not-acknowledged"],
)
async def test_an_outage_leaves_the_letter_pending_and_the_others_sent(
    producer: RefusingProducer,
) -> None:
    waiting, sent = letter(key=b"b", offset=1), letter(key=b"a", offset=2)
    report = await publish_dead_letters(producer, "dlq", [waiting, sent], FAILED_AT, LIMIT)
    assert report.pending == [waiting]
    assert isinstance(report.transient_error, KafkaTimeoutError | KafkaConnectionError)
    assert report.refused == []
    assert producer.acknowledged == 1


async def test_an_outage_on_the_truncated_copy_leaves_the_letter_pending() -> None:
    def refuse(message: dict[str, Any]) -> KafkaError | None:
        return KafkaConnectionError() if truncated(message) else None

    producer = RefusingProducer(
        at_send=larger_than(LIMIT, MessageSizeTooLargeError()), at_delivery=refuse
    )
    big = letter(value=b"b" * LIMIT)
    report = await publish_dead_letters(producer, "dlq", [big], FAILED_AT, LIMIT)
    assert report.pending == [big]
    assert report.refused == []


async def test_an_error_that_is_not_kafkas_is_raised() -> None:
    producer = RefusingProducer(at_delivery=lambda message: ValueError("bug"))
    with pytest.raises(ValueError, match="bug"):
        await publish_dead_letters(producer, "dlq", [letter()], FAILED_AT, LIMIT)

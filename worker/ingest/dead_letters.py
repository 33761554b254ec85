"""Sends messages that cannot be processed to the DLQ topic: bytes and key unchanged, the
reason in headers.

A copy too large for the producer's request limit is written truncated: the value's start,
the original's size and sha256, and the source topic, partition and offset, where the whole
message stays. A dead letter the DLQ refuses even so (authorisation, a DLQ topic whose
`max.message.bytes` is smaller than the truncated copy) is reported back, not retried: the
caller logs and counts it and moves on. Outages are reported back to be waited out.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiokafka.errors import KafkaError
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from worker.ingest.decoding import Rejection
from worker.kafka.producer_errors import ProducerErrorKind, classify_producer_error

HEADER_PREFIX = "dlq."
TRUNCATED_HEADER = HEADER_PREFIX + "truncated"
ORIGINAL_SIZE_HEADER = HEADER_PREFIX + "original_size"
ORIGINAL_SHA256_HEADER = HEADER_PREFIX + "original_sha256"
# Left free below the producer's limit by a truncated copy: aiokafka's size estimate is an
# upper bound already; this keeps clear of off-by-a-few surprises in framing.
TRUNCATION_MARGIN_BYTES = 1024
MAX_VARINT_BYTES = 5


@dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]
    rejection: Rejection


def dead_letter_headers(letter: DeadLetter, failed_at: datetime) -> list[tuple[str, bytes]]:
    """The original headers, then ours. Ours never hold message content (it may be personal)."""
    reason_headers = {
        "error.class": letter.rejection.reason.value,
        "error.message": letter.rejection.detail,
        "source.topic": letter.topic,
        "source.partition": str(letter.partition),
        "source.offset": str(letter.offset),
        "failed_at": failed_at.isoformat(),
    }
    original = [
        (name, value) for name, value in letter.headers if not name.startswith(HEADER_PREFIX)
    ]
    return original + [
        (HEADER_PREFIX + name, value.encode("utf-8")) for name, value in reason_headers.items()
    ]


@dataclass(frozen=True, slots=True)
class DeadLetterCopy:
    """What is produced to the DLQ for one letter."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    @property
    def size(self) -> int:
        """As the producer counts it against `max_request_size` (an upper bound)."""
        return int(
            DefaultRecordBatchBuilder.estimate_size_in_bytes(self.key, self.value, self.headers)
        )


def whole_copy(letter: DeadLetter, failed_at: datetime) -> DeadLetterCopy:
    return DeadLetterCopy(letter.key, letter.value, dead_letter_headers(letter, failed_at))


def truncated_copy(letter: DeadLetter, failed_at: datetime, max_bytes: int) -> DeadLetterCopy:
    """The letter cut to fit `max_bytes` less a margin: the value's start, marked truncated
    with the original's size and sha256. Should the key or the original headers alone leave
    no room, they are left out too. A letter that fits is returned whole, unmarked."""
    whole = whole_copy(letter, failed_at)
    if whole.size <= max_bytes - TRUNCATION_MARGIN_BYTES:
        return whole
    value = letter.value or b""
    ours = [(name, data) for name, data in whole.headers if name.startswith(HEADER_PREFIX)]
    marks = [
        (TRUNCATED_HEADER, b"true"),
        (ORIGINAL_SIZE_HEADER, str(len(value)).encode()),
        (ORIGINAL_SHA256_HEADER, hashlib.sha256(value).hexdigest().encode()),
    ]
    budget = max_bytes - TRUNCATION_MARGIN_BYTES
    for key, headers in (
        (letter.key, whole.headers + marks),
        (letter.key, ours + marks),
        (None, ours + marks),
    ):
        # Less the few bytes the value's length takes once it is no longer empty (varint).
        room = budget - DeadLetterCopy(key, b"", headers).size - MAX_VARINT_BYTES
        if room >= 0:
            return DeadLetterCopy(key, value[:room], headers)
    return DeadLetterCopy(None, b"", ours + marks)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A letter the DLQ refused for good, even truncated."""

    letter: DeadLetter
    error: KafkaError


@dataclass(slots=True)
class PublishReport:
    refused: list[Refusal] = field(default_factory=list)
    # Not acknowledged because of an outage: to send again after a wait.
    pending: list[DeadLetter] = field(default_factory=list)
    transient_error: KafkaError | None = None

    def add_failure(self, letter: DeadLetter, error: KafkaError) -> None:
        if classify_producer_error(error) is ProducerErrorKind.TRANSIENT:
            self.pending.append(letter)
            self.transient_error = error
        else:
            self.refused.append(Refusal(letter, error))


async def publish_dead_letters(
    producer: Any,
    topic: str,
    letters: Sequence[DeadLetter],
    failed_at: datetime,
    max_request_bytes: int,
) -> PublishReport:
    """Sends every letter and waits for the broker's answer to each. A letter too large as
    it is goes again alone, truncated to fit `max_request_bytes` (alone, because the broker
    refuses a whole batch that exceeds the topic's limit, small letters included)."""
    report = PublishReport()
    too_large: list[DeadLetter] = []
    errors = await _send_all(producer, topic, [whole_copy(x, failed_at) for x in letters])
    for letter, error in zip(letters, errors, strict=True):
        if error is None:
            continue
        if classify_producer_error(error) is ProducerErrorKind.TOO_LARGE:
            too_large.append(letter)
        else:
            report.add_failure(letter, error)
    for letter in too_large:
        copy = truncated_copy(letter, failed_at, max_request_bytes)
        [error] = await _send_all(producer, topic, [copy])
        if error is not None:
            report.add_failure(letter, error)
    return report


async def _send_all(
    producer: Any, topic: str, copies: Sequence[DeadLetterCopy]
) -> list[KafkaError | None]:
    """Sends the copies together (one batch where they fit), then waits for every answer:
    None for an acknowledged copy, else its error. Anything but a Kafka error is raised."""
    deliveries: list[asyncio.Future[Any]] = []
    for copy in copies:
        try:
            deliveries.append(
                await producer.send(topic, value=copy.value, key=copy.key, headers=copy.headers)
            )
        except KafkaError as error:  # refused before sending (size) or not queued (timeout)
            deliveries.append(_failed(error))
    answers = await asyncio.gather(*deliveries, return_exceptions=True)
    for answer in answers:
        if isinstance(answer, BaseException) and not isinstance(answer, KafkaError):
            raise answer
    return [answer if isinstance(answer, KafkaError) else None for answer in answers]


def _failed(error: KafkaError) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_exception(error)
    return future

"""Tells a produce error that waiting fixes (a broker down, a leader moving) from one that
it never fixes (this message is too large, this topic refuses us). Pure.

aiokafka marks some error classes `retriable`; those are always transient here. Its
`retriable = False` is not a verdict of permanence: `KafkaTimeoutError` (a batch that
expired while the broker was down) and the base `KafkaError` are not marked retriable, yet
are outages. So the permanent errors are listed by name, and anything unknown is waited
out: a wrong guess then costs a stuck partition (alerted on), never a lost message. (A
corrupt record is transient too: Kafka's own clients retry it, as damage in transit.)
"""

from __future__ import annotations

import enum

from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    InvalidTimestampError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    PolicyViolationError,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    UnsupportedForMessageFormatError,
    UnsupportedVersionError,
)


class ProducerErrorKind(enum.Enum):
    # Waiting fixes it: retry the same message.
    TRANSIENT = "transient"
    # This message, as it is, will never fit: a smaller copy might.
    TOO_LARGE = "too_large"
    # The topic or cluster refuses this message for good (authorisation, a bad topic name,
    # a record the broker cannot accept): only an operator's change helps.
    REFUSED = "refused"


# Broker-side MessageSizeTooLarge (topic max.message.bytes) and the client-side check
# against max_request_size raise the same class.
TOO_LARGE_ERRORS: tuple[type[KafkaError], ...] = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    RecordListTooLargeError,
)
REFUSED_ERRORS: tuple[type[KafkaError], ...] = (
    InvalidTopicError,
    TopicAuthorizationFailedError,
    ClusterAuthorizationFailedError,
    UnsupportedVersionError,
    UnsupportedForMessageFormatError,
    InvalidTimestampError,
    PolicyViolationError,
)


def classify_producer_error(error: BaseException) -> ProducerErrorKind:
    if getattr(error, "retriable", False):
        return ProducerErrorKind.TRANSIENT
    if isinstance(error, TOO_LARGE_ERRORS):
        return ProducerErrorKind.TOO_LARGE
    if isinstance(error, REFUSED_ERRORS):
        return ProducerErrorKind.REFUSED
    return ProducerErrorKind.TRANSIENT

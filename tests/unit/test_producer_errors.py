"""`worker.kafka.producer_errors`: which produce errors are waited out and which never go away."""

from __future__ import annotations

import pytest
from aiokafka import errors

from worker.kafka.producer_errors import (
    REFUSED_ERRORS,
    TOO_LARGE_ERRORS,
    ProducerErrorKind,
    classify_producer_error,
)

TRANSIENT = ProducerErrorKind.TRANSIENT
TOO_LARGE = ProducerErrorKind.TOO_LARGE
REFUSED = ProducerErrorKind.REFUSED


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        # The message itself will never fit: the client's max_request_size check, the
        # broker's max.message.bytes, the consumer side's own name for it.
        (errors.MessageSizeTooLargeError("client-side check"), TOO_LARGE),
        (errors.RecordTooLargeError(), TOO_LARGE),
        (errors.RecordListTooLargeError(), TOO_LARGE),
        # The topic or cluster refuses us: only an operator helps.
        (errors.TopicAuthorizationFailedError(), REFUSED),
        (errors.ClusterAuthorizationFailedError(), REFUSED),
        (errors.InvalidTopicError(), REFUSED),
        (errors.UnsupportedVersionError(), REFUSED),
        (errors.UnsupportedForMessageFormatError(), REFUSED),
        (errors.InvalidTimestampError(), REFUSED),
        (errors.PolicyViolationError(), REFUSED),
        # Outages and moving leaders: waited out.
        (errors.KafkaConnectionError(), TRANSIENT),
        (errors.NodeNotReadyError(), TRANSIENT),
        (errors.NotLeaderForPartitionError(), TRANSIENT),
        (errors.LeaderNotAvailableError(), TRANSIENT),
        (errors.RequestTimedOutError(), TRANSIENT),
        (errors.NotEnoughReplicasError(), TRANSIENT),
        (errors.NotEnoughReplicasAfterAppendError(), TRANSIENT),
        (errors.UnknownTopicOrPartitionError(), TRANSIENT),
        # Not marked retriable by aiokafka, yet what a broker down for a while looks like.
        (errors.KafkaTimeoutError(), TRANSIENT),
        # Unknown: waited out (a stuck partition is alerted on; a dropped message is not).
        (errors.KafkaError(), TRANSIENT),
        (errors.UnknownError(), TRANSIENT),
        (errors.CorruptRecordException(), TRANSIENT),
        (errors.OutOfOrderSequenceNumber(), TRANSIENT),
        (RuntimeError("not from Kafka"), TRANSIENT),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else value.value,
)
def test_classification(error: BaseException, kind: ProducerErrorKind) -> None:
    assert classify_producer_error(error) is kind


@pytest.mark.parametrize("error_class", TOO_LARGE_ERRORS + REFUSED_ERRORS)
def test_no_error_aiokafka_calls_retriable_is_permanent(error_class: type[Exception]) -> None:
    assert getattr(error_class, "retriable", False) is False


def test_a_retriable_error_is_transient_whatever_its_class() -> None:
    class RetriableTooLarge(errors.MessageSizeTooLargeError):
        retriable = True

    assert classify_producer_error(RetriableTooLarge()) is TRANSIENT

"""One consumed batch, sorted into events to store and messages to dead-letter. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from worker.ingest.dead_letters import DeadLetter
from worker.ingest.decoding import AgentEventModel, Rejection, RejectReason, decode_agent_event
from worker.trust.signing import (
    SigningKeys,
    agent_signed_bytes,
    signature_in,
    unauthenticated_reason,
)


class Record(Protocol):
    """The parts of an aiokafka ConsumerRecord the worker reads."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class PartitionProgress:
    topic: str
    partition: int
    next_offset: int
    last_message_at: datetime


@dataclass(frozen=True, slots=True)
class DecodedRecord:
    record: Record
    event: AgentEventModel


@dataclass(slots=True)
class DecodedBatch:
    good: list[DecodedRecord] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    # The offset to commit per (topic, partition): last consumed offset + 1.
    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    progress: list[PartitionProgress] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.good) + len(self.dead_letters)

    def extend(self, later: DecodedBatch) -> None:
        """Appends the messages consumed right after this batch's (the next slice of a
        fetched batch): offsets and progress become the later ones."""
        self.good.extend(later.good)
        self.dead_letters.extend(later.dead_letters)
        self.next_offsets.update(later.next_offsets)
        newest = {(p.topic, p.partition): p for p in self.progress + later.progress}
        self.progress = list(newest.values())


def dead_letter_for(record: Record, rejection: Rejection) -> DeadLetter:
    return DeadLetter(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        value=record.value,
        headers=list(record.headers or ()),
        rejection=rejection,
    )


def decode_batch(
    records: Mapping[Any, Iterable[Record]],
    max_message_bytes: int,
    signing_keys: SigningKeys | None = None,
) -> DecodedBatch:
    """With `signing_keys`, a message the gateway did not sign is a dead letter too."""
    batch = DecodedBatch()
    for partition_records in records.values():
        last: Record | None = None
        for record in partition_records:
            decoded = (
                decode_agent_event(record.value, max_message_bytes)
                if signing_keys is None
                else decode_signed_agent_event(record, max_message_bytes, signing_keys)
            )
            if isinstance(decoded, Rejection):
                batch.dead_letters.append(dead_letter_for(record, decoded))
            else:
                batch.good.append(DecodedRecord(record, decoded))
            last = record
        if last is not None:
            batch.next_offsets[(last.topic, last.partition)] = last.offset + 1
            batch.progress.append(
                PartitionProgress(
                    last.topic,
                    last.partition,
                    last.offset + 1,
                    datetime.fromtimestamp(last.timestamp / 1000, UTC),
                )
            )
    return batch


def decode_signed_agent_event(
    record: Record, max_message_bytes: int, keys: SigningKeys
) -> AgentEventModel | Rejection:
    """The event, if the gateway signed it. Without a signature or with an unknown key, the
    message is refused before it is parsed; the signature itself covers fields of the body,
    so it is checked once the body is decoded (a body that cannot be decoded keeps its
    decoding reason)."""
    signature = signature_in(record.headers)
    reason = unauthenticated_reason(keys, signature)
    if reason is not None:
        return Rejection(RejectReason.UNAUTHENTICATED, reason)
    event = decode_agent_event(record.value, max_message_bytes)
    if isinstance(event, Rejection):
        return event
    signed = agent_signed_bytes(
        event.customer_id, event.device_id, event.event_id, event.type, event.occurred_at
    )
    reason = unauthenticated_reason(keys, signature, signed)
    return event if reason is None else Rejection(RejectReason.UNAUTHENTICATED, reason)

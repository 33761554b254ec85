"""The ingestion loop: Kafka batch in, one Postgres transaction, then the offsets.

Order per batch: decode; dead-letter bad messages (acknowledged by the broker); write the
good ones in one transaction; commit `last offset + 1` per partition. An offset is only
committed for messages that reached the database or the DLQ, or that the DLQ refused for
good even truncated (logged with their offset and counted; worker/ingest/dead_letters.py). Every
write is idempotent (newest event time wins, lifecycle events keyed by event id), so a batch
redelivered after a crash or a rebalance changes nothing the second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from worker.clock import Clock
from worker.db.errors import is_transient_database_error
from worker.db.repository import Repository
from worker.db.session import SignalWriteResult
from worker.db.wait import wait_to_retry
from worker.ingest.batch import (
    DecodedBatch,
    DecodedRecord,
    PartitionProgress,
    Record,
    dead_letter_for,
    decode_batch,
)
from worker.ingest.coalesce import BatchChanges, coalesce
from worker.ingest.dead_letters import DeadLetter, Refusal, publish_dead_letters
from worker.ingest.decoding import AgentEventModel, Rejection, RejectReason
from worker.kafka.clients import PRODUCER_MAX_REQUEST_BYTES
from worker.licensing.decisions import count_license_changes, decide_groups, groups_of_devices
from worker.ops import metrics
from worker.retry import Backoff
from worker.settings import Settings

log = structlog.get_logger(__name__)
T = TypeVar("T")
# While a batch's write takes longer than this, the loop polls Kafka (paused) in between.
KEEPALIVE_SECONDS = 1.0
# How long past its own timeout a paused poll may take before we stop waiting for it.
PAUSED_POLL_GRACE_SECONDS = 1.0
# Messages decoded between two turns of the event loop (a few milliseconds of work).
DECODE_SLICE = 500
# A write is split into concurrent parts only when each gets at least this many devices:
# below that, a second transaction costs more round trips than it saves (latency at low
# rates, when batches are small).
MIN_DEVICES_PER_PART = 500


class ShutdownDuringRetry(Exception):
    """The worker was asked to stop while waiting out an outage; the batch is abandoned
    uncommitted and will be redelivered."""


class FlushBeforeRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    """Lets the batch in hand finish and commit before its partitions move elsewhere.

    aiokafka calls this from its coordinator while `getmany` waits for the new assignment,
    so `flush` must finish the batch itself: waiting for the loop to do it would wait for a
    `getmany` that waits for this listener."""

    def __init__(
        self,
        flush: Callable[[], Awaitable[None]],
        timeout_seconds: float,
        revoking: Callable[[bool], None] = lambda _: None,
    ) -> None:
        self._flush = flush
        self._timeout = timeout_seconds
        self._revoking = revoking

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if not revoked:
            return
        metrics.REBALANCES.inc()
        self._revoking(True)
        try:
            async with asyncio.timeout(self._timeout):
                await self._flush()
            log.info("partitions.revoked", partitions=_names(revoked))
        except TimeoutError:
            # The batch is stuck behind an outage; its commit will be refused and the new
            # owner re-reads it. Idempotent writes make that harmless.
            log.warning("partitions.revoked_mid_batch", partitions=_names(revoked))
        finally:
            self._revoking(False)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("partitions.assigned", partitions=_names(assigned))


class IngestionLoop:
    # Names this loop in the log lines of its waits.
    _task = "ingest"

    def __init__(
        self,
        *,
        settings: Settings,
        consumer: Any,
        producer: Any,
        repository: Repository,
        clock: Clock,
        stopping: asyncio.Event,
        beat: Callable[[], None] = lambda: None,
    ) -> None:
        self._beat = beat
        self._settings = settings
        self._consumer = consumer
        self._producer = producer
        self._repository = repository
        self._clock = clock
        self._stopping = stopping
        self._in_flight: _InFlight | None = None
        # Held while a batch is finished (by the loop, or by the revocation listener).
        self._finishing = asyncio.Lock()
        # True while partitions are being revoked: no `getmany` may be started then, since
        # aiokafka holds it until the rebalance, which waits for the revocation, is over.
        self._revoking = False

    def rebalance_listener(self) -> FlushBeforeRevoke:
        return FlushBeforeRevoke(
            self._finish_in_flight,
            self._settings.rebalance_flush_timeout_seconds,
            self._set_revoking,
        )

    def _set_revoking(self, revoking: bool) -> None:
        self._revoking = revoking

    async def run(self) -> None:
        """Fetch and decode the next batch while the previous one is being written: Python
        and Postgres work at the same time, and offsets are still committed in order, each
        after its own batch's transaction. Only this loop touches the consumer."""
        log.info("ingest.started", topics=list(self._settings.agent_topics))
        try:
            while not self._stopping.is_set():
                records = await self._consumer.getmany(
                    timeout_ms=self._settings.batch_max_wait_ms,
                    max_records=self._settings.batch_max_records,
                )
                self._beat()
                batch = changes = None
                if records:
                    batch, changes = await self._decode(records)
                await self._finish_in_flight()
                if batch is not None and changes is not None:
                    write = asyncio.create_task(self._store(batch, changes), name="ingest-write")
                    self._in_flight = _InFlight(batch, write)
            await self._finish_in_flight()
        except ShutdownDuringRetry:
            log.warning("batch.abandoned_for_shutdown")
            await self._abandon_in_flight()
        log.info("ingest.stopped")

    async def _decode(
        self, records: Mapping[Any, Sequence[Record]]
    ) -> tuple[DecodedBatch, BatchChanges]:
        """Decodes and folds a fetched batch a slice at a time, letting the event loop run
        in between: the write in progress then sends its next statement as soon as
        Postgres answers the last one, instead of after the whole batch is decoded."""
        batch, changes = DecodedBatch(), BatchChanges()
        for part in _slices(records, DECODE_SLICE):
            decoded = decode_batch(part, self._settings.max_message_bytes)
            batch.extend(decoded)
            self._coalesce((item.event for item in decoded.good), into=changes)
            await asyncio.sleep(0)
        return batch, changes

    async def _finish_in_flight(self) -> None:
        """Finishes the batch being written, if any: by the loop before it starts the next
        write, or by the revocation listener during a rebalance, whichever comes first."""
        async with self._finishing:
            in_flight, self._in_flight = self._in_flight, None
            if in_flight is not None:
                await self._finish(in_flight)

    async def _abandon_in_flight(self) -> None:
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None and not in_flight.write.done():
            in_flight.write.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await in_flight.write

    async def _finish(self, in_flight: _InFlight) -> None:
        """Waits for the batch's transaction, dead-letters what it must, commits its offsets."""
        batch = in_flight.batch
        try:
            stored = await self._await_keeping_membership(in_flight.write)
            letters = await self._dead_letter(batch.dead_letters + stored.refused)
            await self._commit(batch.next_offsets)
        finally:
            if not in_flight.write.done():
                in_flight.write.cancel()
        metrics.BATCH_SIZE.observe(batch.size)
        metrics.BATCH_WRITE_SECONDS.observe(stored.seconds)
        _count(batch, stored, letters)
        log.debug("batch.committed", messages=batch.size, dead_letters=len(letters))

    async def _await_keeping_membership(self, write: asyncio.Task[_Stored]) -> _Stored:
        while True:
            done, _ = await asyncio.wait({write}, timeout=KEEPALIVE_SECONDS)
            if done:
                return write.result()
            # A long write (an outage being waited out): keep polling, paused, so the group
            # does not count this worker as dead after `max_poll_interval_ms`.
            await self._poll_paused(0.0)

    async def _store(self, batch: DecodedBatch, changes: BatchChanges) -> _Stored:
        """Writes the batch's changes in up to WRITE_CONCURRENCY transactions at once, one
        per group of customers (they touch disjoint rows), then its progress. If the
        database refuses a group's changes as data (not an outage), that group's messages
        are written one by one so only the refused ones go to the DLQ."""
        started = time.perf_counter()
        parts = changes.split_by_customer(self._settings.write_concurrency, MIN_DEVICES_PER_PART)
        # One part (a small batch): its transaction records the progress too, saving one.
        # Several: the progress waits until all have committed, so that it never claims
        # signals that are not stored yet (the sweeper's guard trusts it).
        together = batch.progress if len(parts) == 1 else []
        results = await _all_or_none(self._write_part(part, together) for part in parts)
        stored = _Stored(refused=[], new_lifecycle_events=set())
        refused_customers: set[str] = set()
        for part, result in zip(parts, results, strict=True):
            if result is None:
                refused_customers.update(part.customer_ids)
            else:
                stored.new_lifecycle_events |= result.inserted_lifecycle_events
        if refused_customers:
            await self._store_refused_customers(batch, refused_customers, stored)
        else:
            metrics.CLAMPED_EVENTS.inc(changes.clamped_events)
        progress_written = bool(together) and results[0] is not None
        if batch.progress and not progress_written:
            await self._retry_database(lambda: self._write(BatchChanges(), batch.progress))
        stored.seconds = time.perf_counter() - started
        return stored

    async def _write_part(
        self, part: BatchChanges, progress: Sequence[PartitionProgress]
    ) -> SignalWriteResult | None:
        """One group of customers' changes in one transaction; None if refused as data."""
        try:
            return await self._retry_database(lambda: self._write(part, progress))
        except _PermanentDatabaseError:
            return None

    async def _store_refused_customers(
        self, batch: DecodedBatch, refused_customers: set[str], stored: _Stored
    ) -> None:
        """The parts of these customers were refused as data: their messages are written
        one by one, so that only the refused ones go to the DLQ."""
        accepted = [i for i in batch.good if i.event.customer_id not in refused_customers]
        metrics.CLAMPED_EVENTS.inc(self._coalesce(i.event for i in accepted).clamped_events)
        retried = await self._store_one_by_one(
            [i for i in batch.good if i.event.customer_id in refused_customers]
        )
        stored.refused = retried.refused
        stored.new_lifecycle_events |= retried.new_lifecycle_events

    async def _store_one_by_one(self, items: Sequence[DecodedRecord]) -> _Stored:
        stored = _Stored(refused=[], new_lifecycle_events=set())
        for item in items:
            changes = self._coalesce([item.event])
            try:
                result = await self._retry_database(
                    lambda c=changes: self._write(c, [])  # type: ignore[misc]
                )
            except _PermanentDatabaseError as error:
                stored.refused.append(_database_rejection(item, error))
                continue
            metrics.CLAMPED_EVENTS.inc(changes.clamped_events)
            stored.new_lifecycle_events |= result.inserted_lifecycle_events
        return stored

    async def _write(
        self, changes: BatchChanges, progress: Sequence[PartitionProgress]
    ) -> SignalWriteResult:
        """Signals and the license decisions they cause, in one transaction."""
        now = self._clock.now()
        window = self._settings.license_window
        async with self._repository.transaction() as session:
            result = await session.write_signals(changes, progress, now - window)
            groups = groups_of_devices(
                (d.customer_id, d.device_id, d.user_id, d.previous_user_id)
                for d in result.license_relevant
            )
            decided = await decide_groups(session, groups, now, now, window)
        count_license_changes(decided)
        return result

    def _coalesce(
        self, events: Iterable[AgentEventModel], into: BatchChanges | None = None
    ) -> BatchChanges:
        return coalesce(events, self._clock.now(), self._settings.future_tolerance, into)

    async def _retry_database(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Runs `operation` until it succeeds, waiting after each transient error until
        Postgres answers again (worker/db/wait.py); a permanent error is raised."""
        backoff = Backoff(self._settings.retry_initial_seconds, self._settings.retry_max_seconds)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await operation()
            except Exception as error:
                if not is_transient_database_error(error):
                    metrics.DATABASE_ERRORS.labels("permanent").inc()
                    log.error("database.rejected_batch", error=_error_name(error))
                    raise _PermanentDatabaseError(error) from error
                metrics.DATABASE_ERRORS.labels("transient").inc()
                log.warning("database.unavailable", error=_error_name(error), attempt=attempt)
                await self._wait_for_database(backoff)

    async def _wait_for_database(self, backoff: Backoff) -> None:
        if self._stopping.is_set():
            raise ShutdownDuringRetry
        answers = self._repository.answers
        await wait_to_retry(answers, backoff, self._stopping, task=self._task, beat=self._beat)
        if self._stopping.is_set():
            raise ShutdownDuringRetry

    async def _retry_kafka(self, operation_name: str, operation: Callable[[], Awaitable[T]]) -> T:
        backoff = Backoff(self._settings.retry_initial_seconds, self._settings.retry_max_seconds)
        while True:
            try:
                return await operation()
            except KafkaError as error:
                metrics.KAFKA_ERRORS.labels(operation_name).inc()
                delay = backoff.next_delay()
                log.warning(
                    "kafka.unavailable",
                    operation=operation_name,
                    error=_error_name(error),
                    attempt=backoff.attempts,
                    retry_in_seconds=round(delay, 2),
                )
                await self._wait_keeping_membership(delay)

    async def _wait_keeping_membership(self, delay: float) -> None:
        """Waits out a Kafka outage (DLQ, commit) while still polling, paused."""
        if self._stopping.is_set():
            raise ShutdownDuringRetry
        await self._poll_paused(delay)
        if self._stopping.is_set():
            raise ShutdownDuringRetry

    async def _poll_paused(self, seconds: float) -> None:
        """Polls Kafka with every partition paused: the group keeps this worker as a live
        member (`max_poll_interval_ms`) and no record is consumed. During a revocation it
        only waits: the rebalance is what keeps the membership then."""
        if self._revoking:
            await asyncio.sleep(seconds)
            self._beat()
            return
        paused = self._consumer.assignment()
        self._consumer.pause(*paused)
        metrics.PAUSED_PARTITIONS.set(len(paused))
        try:
            try:
                # Bounded: a rebalance starting now holds getmany until the new assignment,
                # and the revocation listener may be waiting for this very batch.
                unexpected = await asyncio.wait_for(
                    self._consumer.getmany(timeout_ms=int(seconds * 1000)),
                    seconds + PAUSED_POLL_GRACE_SECONDS,
                )
            except TimeoutError:
                unexpected = {}  # held by a rebalance: nothing was handed out
            # A partition assigned while we waited is not paused: put back what it returned.
            for partition, records in unexpected.items():
                self._consumer.seek(partition, records[0].offset)
        finally:
            self._consumer.resume(*self._consumer.assignment())
            metrics.PAUSED_PARTITIONS.set(0)
        self._beat()

    async def _dead_letter(self, letters: Sequence[DeadLetter]) -> list[DeadLetter]:
        """Writes the letters to the DLQ, waiting out outages; returns those written. One
        the DLQ refuses for good, even truncated, is logged and counted, and left behind:
        the original stays in its source topic, and no partition waits for an operator."""
        pending, refused = list(letters), set[tuple[str, int, int]]()

        async def attempt() -> None:
            nonlocal pending
            report = await publish_dead_letters(
                self._producer,
                self._settings.dlq_topic,
                pending,
                self._clock.now(),
                PRODUCER_MAX_REQUEST_BYTES,
            )
            for refusal in report.refused:
                _log_refused_dead_letter(refusal)
                refused.add(_source_of(refusal.letter))
            pending = report.pending
            if report.transient_error is not None:
                raise report.transient_error

        if pending:
            await self._retry_kafka("dead_letter", attempt)
        return [letter for letter in letters if _source_of(letter) not in refused]

    async def _commit(self, next_offsets: Mapping[tuple[str, int], int]) -> None:
        assigned = self._consumer.assignment()
        offsets = {
            TopicPartition(topic, partition): offset
            for (topic, partition), offset in next_offsets.items()
            if TopicPartition(topic, partition) in assigned
        }
        if not offsets:
            return
        try:
            await self._retry_kafka("commit", lambda: self._consumer.commit(offsets))
        except (CommitFailedError, IllegalStateError) as error:
            # The group moved on: the new owner re-reads from the last committed offset and
            # the idempotent writes make the repeat harmless.
            metrics.KAFKA_ERRORS.labels("commit_refused").inc()
            log.warning("batch.commit_refused", error=_error_name(error))


@dataclass(slots=True)
class _Stored:
    refused: list[DeadLetter]
    # (customer_id, event_id) of lifecycle events recorded for the first time.
    new_lifecycle_events: set[tuple[str, str]]
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class _InFlight:
    batch: DecodedBatch
    write: asyncio.Task[_Stored]


def _count(batch: DecodedBatch, stored: _Stored, letters: Sequence[DeadLetter]) -> None:
    """Counts the batch's outcomes, then touches each metric child once (not per message)."""
    refused = {(letter.topic, letter.partition, letter.offset) for letter in stored.refused}
    first_seen = set(stored.new_lifecycle_events)
    outcomes: Counter[tuple[str, str, str]] = Counter()
    for item in batch.good:
        record, event = item.record, item.event
        if refused and (record.topic, record.partition, record.offset) in refused:
            continue
        outcome = "stored"
        if event.type != "heartbeat":
            key = (event.customer_id, event.event_id)
            outcome = "stored" if key in first_seen else "duplicate"
            first_seen.discard(key)
        outcomes[(record.topic, event.type, outcome)] += 1
    reasons: Counter[tuple[str, str]] = Counter()
    for letter in letters:
        outcomes[(letter.topic, "unknown", "dead_lettered")] += 1
        reasons[(letter.topic, letter.rejection.reason.value)] += 1
    for (topic, event_type, outcome), count in outcomes.items():
        metrics.EVENTS.labels(topic, event_type, outcome).inc(count)
    for (topic, reason), count in reasons.items():
        metrics.DEAD_LETTERS.labels(topic, reason).inc(count)


async def _all_or_none(operations: Iterable[Awaitable[T]]) -> list[T]:
    """Runs the operations concurrently and returns their results in order. If one fails
    (a shutdown while waiting out an outage) or the caller is cancelled, the others are
    cancelled and waited for: no transaction is left running unseen."""
    tasks = [asyncio.ensure_future(operation) for operation in operations]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _PermanentDatabaseError(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(_error_name(cause))
        self.cause = cause


def _database_rejection(item: DecodedRecord, error: _PermanentDatabaseError) -> DeadLetter:
    return dead_letter_for(
        item.record, Rejection(RejectReason.DATABASE_REJECTED, _error_name(error.cause))
    )


def _source_of(letter: DeadLetter) -> tuple[str, int, int]:
    return (letter.topic, letter.partition, letter.offset)


def _log_refused_dead_letter(refusal: Refusal) -> None:
    letter = refusal.letter
    value = letter.value or b""
    metrics.DEAD_LETTERS_FAILED.labels(
        letter.topic, letter.rejection.reason.value, _error_name(refusal.error)
    ).inc()
    metrics.EVENTS.labels(letter.topic, "unknown", "dead_letter_refused").inc()
    log.error(
        "dead_letter.refused",
        source_topic=letter.topic,
        source_partition=letter.partition,
        source_offset=letter.offset,
        original_size=len(value),
        original_sha256=hashlib.sha256(value).hexdigest(),
        reason=letter.rejection.reason.value,
        error=_error_name(refusal.error),
    )


def _error_name(error: BaseException) -> str:
    return type(error).__name__


def _slices(
    records: Mapping[Any, Sequence[Record]], size: int
) -> Iterable[dict[Any, Sequence[Record]]]:
    """The batch in slices of about `size` messages, each partition's in order."""
    for partition, partition_records in records.items():
        for start in range(0, len(partition_records), size):
            yield {partition: partition_records[start : start + size]}


def _names(partitions: set[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions)

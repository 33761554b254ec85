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
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import structlog
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from worker.db.session import LicenseRow, Session, SignalWriteResult, WrittenDevice
from worker.db.wait import pause
from worker.ingest.batch import (
    DecodedBatch,
    DecodedRecord,
    PartitionProgress,
    Record,
    dead_letter_for,
    decode_batch,
)
from worker.ingest.coalesce import BatchChanges, coalesce
from worker.ingest.consumer_session import (
    ConsumerSession,
    FlushBeforeRevoke,
    PermanentDatabaseError,
    database_rejection,
)
from worker.ingest.dead_letters import DeadLetter
from worker.ingest.decoding import AgentEventModel, Rejection, RejectReason
from worker.ingest.last_seen_memory import (
    DeviceKey,
    LastSeenMemory,
    Remembered,
    co_partitioning_problem,
    keep_back_unchanged,
)
from worker.licensing.decisions import count_license_changes, decide_groups, groups_of_devices
from worker.ops import metrics
from worker.retry import Stopped
from worker.settings import Settings

log = structlog.get_logger(__name__)
T = TypeVar("T")
# Messages decoded between two turns of the event loop (a few milliseconds of work).
DECODE_SLICE = 500
# A write is split into concurrent parts only when each gets at least this many devices:
# below that, a second transaction costs more round trips than it saves (latency at low
# rates, when batches are small).
MIN_DEVICES_PER_PART = 500
# How often a batch waiting for the console asks again (_wait_for_console).
CONSOLE_POLL_SECONDS = 1.0


class IngestionLoop:
    """Agent events: decoded and folded here, written concurrently per group of customers
    with their license decisions; the Kafka mechanics are the consumer session's."""

    def __init__(
        self, session: ConsumerSession, console_behind: Callable[[], Awaitable[int]] | None = None
    ) -> None:
        """`console_behind`: how many console messages the console's consumer group has not
        applied yet (None: unknown customers' signals are refused at once)."""
        self._session = session
        self._console_behind = console_behind
        # True while a batch waits for the console (the monitor then calls nothing stuck).
        self.waiting_for_console = False
        self._signing_keys = session.settings.agent_signing_keys()
        self._admit_customers = session.settings.unknown_customers == "admit"
        self._in_flight: _InFlight | None = None
        # Held while a batch is finished (by the loop, or by the revocation listener).
        self._finishing = asyncio.Lock()
        settings = session.settings
        # Last-seen precision (docs/ingestion.md): on only while the assignment allows it.
        self._precision = settings.last_seen_precision
        self._memory = LastSeenMemory(settings.last_seen_memory_devices)
        self._skipping = False
        self._not_skipping_because: str | None = None
        metrics.LAST_SEEN_SKIPPING.set(0)

    def rebalance_listener(self) -> FlushBeforeRevoke:
        return self._session.rebalance_listener(
            self._finish_before_revoke,
            revoked=self._forget_devices,
            assigned=self._check_assignment,
        )

    async def _finish_before_revoke(self) -> None:
        await self._finish_in_flight()
        await self._write_kept_back()

    async def _write_kept_back(self) -> None:
        """Writes the heartbeats kept back (last-seen precision) before this replica loses
        its devices: the new owner starts from them, and a later, older uninstall is decided
        as if they had been written. Not remembered: the memory is about to be emptied."""
        changes = self._memory.take_kept_back()
        if changes.devices:
            await self._session.retry_database(lambda: self._write(changes, []))
            log.info("ingest.kept_back_written", devices=len(changes.devices))

    def _forget_devices(self) -> None:
        """aiokafka's rebalances are eager: a revocation takes every partition, so the memory
        of every device goes with it (the new owner writes each device's first heartbeat)."""
        self._memory.forget_all()
        self._skipping = False
        metrics.LAST_SEEN_SKIPPING.set(0)

    def _check_assignment(self, assigned: set[TopicPartition]) -> None:
        """Skips heartbeats only if this assignment gives this replica every signal of each
        device it writes; otherwise writes every heartbeat, and says why once."""
        settings = self._session.settings
        if self._precision <= timedelta(0) or self._memory.capacity == 0:
            return
        topics = settings.agent_topics
        counts = tuple(_partition_count(self._session.consumer, topic) for topic in topics)
        problem = co_partitioning_problem(
            topics, (counts[0], counts[1]), ((tp.topic, tp.partition) for tp in assigned)
        )
        self._skipping = problem is None
        metrics.LAST_SEEN_SKIPPING.set(1 if self._skipping else 0)
        if problem is not None and problem != self._not_skipping_because:
            log.warning(
                "ingest.writing_every_heartbeat",
                reason=problem,
                heartbeat_partitions=counts[0],
                lifecycle_partitions=counts[1],
            )
        self._not_skipping_because = problem

    async def run(self) -> None:
        """Fetch and decode the next batch while the previous one is being written: Python
        and Postgres work at the same time, and offsets are still committed in order, each
        after its own batch's transaction. Only this loop touches the consumer."""
        log.info("ingest.started", topics=list(self._session.settings.agent_topics))
        try:
            await self._session.consume(self._session.settings.batch_max_records, self._take)
            await self._finish_before_revoke()
        except Stopped:
            log.warning("ingest.batch_abandoned_for_shutdown")
            await self._abandon_in_flight()
        log.info("ingest.stopped")

    async def _take(self, records: Mapping[Any, Sequence[Record]]) -> None:
        """Starts the write of a fetched batch once the previous one is committed."""
        batch = changes = None
        if records:
            batch, changes = await self._decode(records)
        await self._finish_in_flight()
        if batch is not None and changes is not None:
            write = asyncio.create_task(self._store(batch, changes), name="ingest-write")
            self._in_flight = _InFlight(batch, write)

    async def _decode(
        self, records: Mapping[Any, Sequence[Record]]
    ) -> tuple[DecodedBatch, BatchChanges]:
        """Decodes and folds a fetched batch a slice at a time, letting the event loop run
        in between: the write in progress then sends its next statement as soon as
        Postgres answers the last one, instead of after the whole batch is decoded."""
        batch, changes = DecodedBatch(), BatchChanges()
        for part in _slices(records, DECODE_SLICE):
            decoded = decode_batch(
                part, self._session.settings.max_message_bytes, self._signing_keys
            )
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
            stored = await self._session.await_keeping_membership(in_flight.write)
            letters = await self._session.dead_letter(batch.dead_letters + stored.refused)
            await self._session.commit(batch.next_offsets)
        finally:
            if not in_flight.write.done():
                in_flight.write.cancel()
        metrics.BATCH_SIZE.observe(batch.size)
        metrics.BATCH_WRITE_SECONDS.observe(stored.seconds)
        _count(batch, stored, letters)
        log.debug("ingest.batch_committed", messages=batch.size, dead_letters=len(letters))

    async def _store(self, batch: DecodedBatch, changes: BatchChanges) -> _Stored:
        """Writes the batch's changes in up to WRITE_CONCURRENCY transactions at once, one
        per group of customers (they touch disjoint rows), then its progress. If the
        database refuses a group's changes as data (not an outage), that group's messages
        are written one by one so only the refused ones go to the DLQ."""
        started = time.perf_counter()
        changes, unknown = await self._refuse_unknown_customers(batch, changes)
        # From here to the writes' results, nothing awaits: the memory is the one of now.
        refresh: set[DeviceKey] = set()  # plain last-seen moves, written more cheaply
        skipped, remember = self._keep_back_unchanged(changes, refresh), self._skipping
        generation = self._memory.generation
        parts = changes.split_by_customer(
            self._session.settings.write_concurrency, MIN_DEVICES_PER_PART
        )
        # One part (a small batch): its transaction records the progress too, saving one.
        # Several: the progress waits until all have committed, so that it never claims
        # signals that are not stored yet (the sweeper's guard trusts it).
        together = batch.progress if len(parts) == 1 else []
        results = await _all_or_none(
            self._write_part(part, together, remember, refresh) for part in parts
        )
        stored = _Stored(refused=unknown, new_lifecycle_events=set(), skipped=skipped)
        refused_customers: set[str] = set()
        for part, result in zip(parts, results, strict=True):
            if result is None:
                refused_customers.update(part.customer_ids)
            else:
                stored.new_lifecycle_events |= result.inserted_lifecycle_events
                self._remember(result.written, generation)
        if refused_customers:
            await self._store_refused_customers(batch, refused_customers, stored)
        else:
            metrics.CLAMPED_EVENTS.inc(changes.clamped_events)
        progress_written = bool(together) and results[0] is not None
        if batch.progress and not progress_written:
            await self._session.retry_database(lambda: self._write(BatchChanges(), batch.progress))
        stored.seconds = time.perf_counter() - started
        return stored

    async def _refuse_unknown_customers(
        self, batch: DecodedBatch, changes: BatchChanges
    ) -> tuple[BatchChanges, list[DeadLetter]]:
        """The changes of the customers the console created, and the dead letters of the
        signals for any other (UNKNOWN_CUSTOMERS=refuse). A customer is never deleted, so
        one known here is still known when the write runs; should it be, the write does not
        create it and its foreign keys refuse the rows."""
        if self._admit_customers or not changes.devices:
            return changes, []
        unknown = await self._unknown_customers(changes.customer_ids)
        if unknown:
            waited = await self._wait_for_console(batch, unknown)
            if waited is None:  # revoked meanwhile: the new owner reads them again
                return changes.without_customers(unknown), []
            unknown = waited
        if not unknown:
            return changes, []
        rejection = Rejection(RejectReason.UNKNOWN_CUSTOMER, "customer_id: never created")
        letters = [
            dead_letter_for(item.record, rejection)
            for item in batch.good
            if item.event.customer_id in unknown
        ]
        return changes.without_customers(unknown), letters

    async def _unknown_customers(self, customer_ids: Collection[str]) -> set[str]:
        """Those of these customers that are not in the database."""
        repository, wanted = self._session.repository, sorted(customer_ids)
        rows = await self._session.retry_database(
            lambda: repository.fetch("existing_customers", wanted)
        )
        return set(wanted) - {row["customer_id"] for row in rows}

    async def _wait_for_console(self, batch: DecodedBatch, unknown: set[str]) -> set[str] | None:
        """While the console's consumer group has not applied every console message (one
        may create these customers: the group rebalancing, its replica restarting), waits
        for it, up to CONSOLE_CATCH_UP_WAIT_SECONDS, and returns the customers still not in
        the database: those the console never created, or all of them once the wait ran
        out. None: every partition of the batch was revoked meanwhile. A Kafka error while
        asking counts as behind."""
        seconds = self._session.settings.console_catch_up_wait_seconds
        if self._console_behind is None or seconds <= 0:
            return unknown
        started = time.monotonic()
        behind = await self._console_messages_behind()
        if behind == 0:
            return unknown
        log.warning(
            "ingest.waiting_for_console",
            customers=len(unknown),
            console_messages_behind=behind,
            wait_seconds=seconds,
        )
        metrics.WAITING_FOR_CONSOLE.set(1)
        self.waiting_for_console = True
        try:
            while unknown and behind != 0:
                if time.monotonic() - started >= seconds:
                    log.error(
                        "ingest.console_wait_expired",
                        customers=len(unknown),
                        console_messages_behind=behind,
                        waited_seconds=round(time.monotonic() - started, 1),
                    )
                    return unknown
                await pause(self._session.stopping, CONSOLE_POLL_SECONDS)
                if self._session.stopping.is_set():
                    raise Stopped
                if not self._still_assigned(batch):
                    return None
                unknown = await self._unknown_customers(unknown)
                behind = await self._console_messages_behind()
        finally:
            metrics.WAITING_FOR_CONSOLE.set(0)
            self.waiting_for_console = False
        log.info(
            "ingest.console_caught_up",
            customers_still_unknown=len(unknown),
            waited_seconds=round(time.monotonic() - started, 1),
        )
        return unknown

    async def _console_messages_behind(self) -> int | None:
        """The console group's backlog; None if Kafka did not say."""
        assert self._console_behind is not None
        try:
            return await self._console_behind()
        except KafkaError as error:
            log.warning("ingest.console_progress_unknown", error=type(error).__name__)
            return None

    def _still_assigned(self, batch: DecodedBatch) -> bool:
        assigned = self._session.consumer.assignment()
        return any(TopicPartition(topic, p) in assigned for topic, p in batch.next_offsets)

    async def _write_part(
        self,
        part: BatchChanges,
        progress: Sequence[PartitionProgress],
        remember: bool,
        refresh: set[DeviceKey],
    ) -> SignalWriteResult | None:
        """One group of customers' changes in one transaction; None if refused as data."""
        try:
            return await self._session.retry_database(
                lambda: self._write(part, progress, remember=remember, refresh=refresh)
            )
        except PermanentDatabaseError:
            return None

    async def _store_refused_customers(
        self, batch: DecodedBatch, refused_customers: set[str], stored: _Stored
    ) -> None:
        """The parts of these customers were refused as data: their messages are written
        one by one, so that only the refused ones go to the DLQ. Their devices are forgotten:
        what this replica remembers of them may no longer be what is stored."""
        self._memory.forget(
            (i.event.customer_id, i.event.device_id)
            for i in batch.good
            if i.event.customer_id in refused_customers
        )
        accepted = [i for i in batch.good if i.event.customer_id not in refused_customers]
        metrics.CLAMPED_EVENTS.inc(self._coalesce(i.event for i in accepted).clamped_events)
        retried = await self._store_one_by_one(
            [i for i in batch.good if i.event.customer_id in refused_customers]
        )
        stored.refused += retried.refused
        stored.new_lifecycle_events |= retried.new_lifecycle_events

    async def _store_one_by_one(self, items: Sequence[DecodedRecord]) -> _Stored:
        stored = _Stored(refused=[], new_lifecycle_events=set(), skipped=set())
        for item in items:
            changes = self._coalesce([item.event])
            try:
                result = await self._session.retry_database(
                    lambda c=changes: self._write(c, [])  # type: ignore[misc]
                )
            except PermanentDatabaseError as error:
                stored.refused.append(database_rejection(item.record, error))
                continue
            metrics.CLAMPED_EVENTS.inc(changes.clamped_events)
            stored.new_lifecycle_events |= result.inserted_lifecycle_events
        return stored

    async def _write(
        self,
        changes: BatchChanges,
        progress: Sequence[PartitionProgress],
        *,
        remember: bool = False,
        refresh: Collection[DeviceKey] = (),
    ) -> SignalWriteResult:
        """Signals and the license decisions they cause, in one transaction. `remember`:
        the result lists every device written, for the last-seen memory; `refresh`: the
        devices whose change is likely a plain last-seen move (`Session.write_signals`)."""
        now = self._session.clock.now()
        async with self._session.repository.transaction() as session:
            result, decided = await write_and_decide(
                session,
                changes,
                progress,
                self._session.settings,
                now,
                create_customers=self._admit_customers,
                remember=remember,
                refresh=refresh,
            )
        count_license_changes(decided)
        return result

    def _keep_back_unchanged(
        self, changes: BatchChanges, refresh: set[DeviceKey]
    ) -> set[DeviceKey]:
        """The devices whose changes are kept back, not written (last-seen precision); adds
        to `refresh` the written ones that only move the last seen."""
        if not self._skipping:
            return set()
        return keep_back_unchanged(changes, self._memory, self._precision, refresh)

    def _remember(self, written: Sequence[WrittenDevice], generation: int) -> None:
        for device in written:
            state = Remembered(
                device.last_seen_at,
                device.user_id,
                device.device_kind,
                device.agent_version,
                device.protected,
            )
            self._memory.remember((device.customer_id, device.device_id), state, generation)

    def _coalesce(
        self, events: Iterable[AgentEventModel], into: BatchChanges | None = None
    ) -> BatchChanges:
        return coalesce(
            events, self._session.clock.now(), self._session.settings.future_tolerance, into
        )


@dataclass(slots=True)
class _Stored:
    refused: list[DeadLetter]
    # (customer_id, event_id) of lifecycle events recorded for the first time.
    new_lifecycle_events: set[tuple[str, str]]
    # Devices whose heartbeats were kept back, not written (last-seen precision).
    skipped: set[DeviceKey]
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class _InFlight:
    batch: DecodedBatch
    write: asyncio.Task[_Stored]


async def write_and_decide(
    session: Session,
    changes: BatchChanges,
    progress: Sequence[PartitionProgress],
    settings: Settings,
    now: datetime,
    *,
    create_customers: bool = True,
    remember: bool = False,
    refresh: Collection[DeviceKey] = (),
) -> tuple[SignalWriteResult, list[LicenseRow]]:
    """A batch's signals and the license decisions they cause, in the caller's transaction
    (`now`: the service's clock). The subjects the batch created are new to the decisions:
    they hold no license and no pending allocation, so nothing of theirs is read."""
    window = settings.release_window
    result = await session.write_signals(
        changes,
        progress,
        now - window,
        create_customers=create_customers,
        recorded_at=now,
        remember=remember,
        refresh=refresh,
    )
    groups = groups_of_devices(
        (d.customer_id, d.device_id, d.user_id, d.previous_user_id) for d in result.license_relevant
    )
    decided = await decide_groups(
        session,
        groups,
        now,
        now,
        window,
        settle=settings.allocation_settle,
        event_key=settings.event_id_key(),
        written=result.subjects,
        customers_locked=True,  # write_signals took them (share_customers)
    )
    return result, decided


def _count(batch: DecodedBatch, stored: _Stored, letters: Sequence[DeadLetter]) -> None:
    """Counts the batch's outcomes, then touches each metric child once (not per message)."""
    refused = {(letter.topic, letter.partition, letter.offset) for letter in stored.refused}
    first_seen = set(stored.new_lifecycle_events)
    skipped = stored.skipped
    outcomes: Counter[tuple[str, str, str]] = Counter()
    for item in batch.good:
        record, event = item.record, item.event
        if refused and (record.topic, record.partition, record.offset) in refused:
            continue
        outcome = "stored"
        if skipped and (event.customer_id, event.device_id) in skipped:
            outcome = "skipped"  # only heartbeats: a device with any other event is written
        elif event.type != "heartbeat":
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
        if outcome == "skipped":
            metrics.HEARTBEATS_SKIPPED.inc(count)
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


def _slices(
    records: Mapping[Any, Sequence[Record]], size: int
) -> Iterable[dict[Any, Sequence[Record]]]:
    """The batch in slices of about `size` messages, each partition's in order."""
    for partition, partition_records in records.items():
        for start in range(0, len(partition_records), size):
            yield {partition: partition_records[start : start + size]}


def _partition_count(consumer: Any, topic: str) -> int | None:
    """The topic's partition count in the consumer's metadata (None if unknown)."""
    partitions = consumer.partitions_for_topic(topic)
    return None if not partitions else len(partitions)

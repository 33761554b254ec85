"""A consumer's Kafka mechanics, shared by the agent loop (worker/ingest/loop.py) and the
console loop (worker/tenants/loop.py), each of which brings its own write step.

The session fetches batches; keeps the group membership while a write waits out an outage
(polling with every partition paused); retries database writes (waiting on the probe,
worker/db/wait.py) and Kafka operations (backoff, still polling paused); dead-letters
through worker/ingest/dead_letters.py; commits `last offset + 1` per partition, only for
partitions still assigned; and builds the rebalance listener that lets the batch in hand
finish before its partitions are revoked (FlushBeforeRevoke).

It lives in worker/ingest/ rather than worker/kafka/ because it speaks the ingestion's
terms (dead letters, database rejections, decoded batches' offsets); worker/kafka/ stays
the clients and their error vocabulary, which it uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from worker.clock import Clock
from worker.db.errors import is_transient_database_error
from worker.db.repository import Repository
from worker.db.wait import wait_to_retry
from worker.ingest.batch import Record, dead_letter_for
from worker.ingest.dead_letters import DeadLetter, Refusal, publish_dead_letters
from worker.ingest.decoding import Rejection, RejectReason
from worker.kafka.clients import PRODUCER_MAX_REQUEST_BYTES
from worker.ops import metrics
from worker.retry import Backoff, Stopped, retry
from worker.settings import Settings

log = structlog.get_logger(__name__)
T = TypeVar("T")
# While a batch's write takes longer than this, the session polls Kafka (paused) in between.
KEEPALIVE_SECONDS = 1.0
# How long past its own timeout a paused poll may take before we stop waiting for it.
PAUSED_POLL_GRACE_SECONDS = 1.0


class PermanentDatabaseError(Exception):
    """The database refused an operation as data (not an outage): retrying cannot help."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(_error_name(cause))
        self.cause = cause


def database_rejection(record: Record, error: PermanentDatabaseError) -> DeadLetter:
    """The dead letter of a message whose write the database refused."""
    return dead_letter_for(
        record, Rejection(RejectReason.DATABASE_REJECTED, _error_name(error.cause))
    )


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
        *,
        revoked: Callable[[], None] = lambda: None,
        assigned: Callable[[set[TopicPartition]], None] = lambda _: None,
    ) -> None:
        self._flush = flush
        self._timeout = timeout_seconds
        self._revoking = revoking
        self._revoked = revoked
        self._assigned = assigned

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if not revoked:
            return
        metrics.REBALANCES.inc()
        self._revoking(True)
        try:
            async with asyncio.timeout(self._timeout):
                await self._flush()
            log.info("ingest.partitions_revoked", partitions=_names(revoked))
        except TimeoutError:
            # The batch is stuck behind an outage; its commit will be refused and the new
            # owner re-reads it. Idempotent writes make that harmless.
            log.warning("ingest.partitions_revoked_mid_batch", partitions=_names(revoked))
        finally:
            self._revoked()
            self._revoking(False)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("ingest.partitions_assigned", partitions=_names(assigned))
        self._assigned(assigned)


@dataclass(kw_only=True, eq=False)
class ConsumerSession:
    """One consumer's fetches, waits, dead letters and commits, and what a loop's write step
    needs besides (settings, repository, clock). `task` names the loop in the log lines of
    its waits; `stopping` ends every wait (the operation raises Stopped)."""

    settings: Settings
    consumer: Any
    producer: Any
    repository: Repository
    clock: Clock
    stopping: asyncio.Event
    beat: Callable[[], None]
    task: str
    # True while partitions are being revoked: no `getmany` may be started then, since
    # aiokafka holds it until the rebalance, which waits for the revocation, is over.
    _revoking: bool = field(default=False, init=False)

    def rebalance_listener(
        self,
        flush: Callable[[], Awaitable[None]],
        *,
        revoked: Callable[[], None] = lambda: None,
        assigned: Callable[[set[TopicPartition]], None] = lambda _: None,
    ) -> FlushBeforeRevoke:
        """A listener that runs `flush` (finish the batch in hand) before a revocation, then
        `revoked` (even if the flush timed out), and `assigned` with each new assignment."""
        return FlushBeforeRevoke(
            flush,
            self.settings.rebalance_flush_timeout_seconds,
            self._set_revoking,
            revoked=revoked,
            assigned=assigned,
        )

    def _set_revoking(self, revoking: bool) -> None:
        self._revoking = revoking

    async def consume(
        self, max_records: int, take: Callable[[Mapping[Any, Sequence[Record]]], Awaitable[None]]
    ) -> None:
        """Hands each fetched batch (possibly empty) to `take` until `stopping` is set."""
        while not self.stopping.is_set():
            await take(await self.fetch(max_records))

    async def fetch(self, max_records: int) -> Mapping[Any, Sequence[Record]]:
        """The next batch: whatever arrived within `batch_max_wait_ms`, possibly nothing.
        A rebalance can hold `getmany` far longer (until the group's slowest member has
        rejoined); `stopping` ends that wait, with nothing: the records it would have
        returned are not committed, and the next owner reads them."""
        fetching = asyncio.ensure_future(
            self.consumer.getmany(
                timeout_ms=self.settings.batch_max_wait_ms, max_records=max_records
            )
        )
        stop_requested = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({fetching, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_requested.cancel()
        if not fetching.done():
            fetching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fetching
            return {}
        records: Mapping[Any, Sequence[Record]] = fetching.result()
        self.beat()
        return records

    async def await_keeping_membership(self, write: asyncio.Task[T]) -> T:
        """The write's result; while it runs long (an outage being waited out), the session
        polls paused, so the group does not count this worker as dead after
        `max_poll_interval_ms`."""
        while True:
            done, _ = await asyncio.wait({write}, timeout=KEEPALIVE_SECONDS)
            if done:
                return write.result()
            await self._poll_paused(0.0)

    async def retry_database(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Runs `operation` until it succeeds, waiting after each transient error until
        Postgres answers again (worker/db/wait.py); a permanent error is raised as
        PermanentDatabaseError."""
        backoff = self._backoff()
        failures = 0

        async def wait(error: Exception) -> None:
            nonlocal failures
            failures += 1
            metrics.DATABASE_ERRORS.labels("transient").inc()
            log.warning("database.unavailable", error=_error_name(error), attempt=failures)
            answers = self.repository.answers
            await wait_to_retry(answers, backoff, self.stopping, task=self.task, beat=self.beat)

        try:
            return await retry(
                operation, retriable=is_transient_database_error, wait=wait, stopping=self.stopping
            )
        except Stopped:
            raise
        except Exception as error:  # not transient: refused as data
            metrics.DATABASE_ERRORS.labels("permanent").inc()
            log.error("database.rejected_batch", error=_error_name(error))
            raise PermanentDatabaseError(error) from error

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> list[DeadLetter]:
        """Writes the letters to the DLQ, waiting out outages; returns those written. One
        the DLQ refuses for good, even truncated, is logged and counted, and left behind:
        the original stays in its source topic, and no partition waits for an operator."""
        pending, refused = list(letters), set[tuple[str, int, int]]()

        async def attempt() -> None:
            nonlocal pending
            report = await publish_dead_letters(
                self.producer,
                self.settings.dlq_topic,
                pending,
                self.clock.now(),
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

    async def commit(self, next_offsets: Mapping[tuple[str, int], int]) -> None:
        """Commits these next offsets (`last offset + 1`) of the partitions still assigned."""
        assigned = self.consumer.assignment()
        offsets = {
            TopicPartition(topic, partition): offset
            for (topic, partition), offset in next_offsets.items()
            if TopicPartition(topic, partition) in assigned
        }
        if not offsets:
            return
        try:
            await self._retry_kafka("commit", lambda: self.consumer.commit(offsets))
        except (CommitFailedError, IllegalStateError) as error:
            # The group moved on: the new owner re-reads from the last committed offset and
            # the idempotent writes make the repeat harmless.
            metrics.KAFKA_ERRORS.labels("commit_refused").inc()
            log.warning("ingest.commit_refused", error=_error_name(error))

    async def _retry_kafka(self, operation_name: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Runs `operation` until it succeeds, backing off after each Kafka error while
        polling paused (a non-Kafka error is raised)."""
        backoff = self._backoff()

        async def wait(error: Exception) -> None:
            metrics.KAFKA_ERRORS.labels(operation_name).inc()
            delay = backoff.next_delay()
            log.warning(
                "kafka.unavailable",
                operation=operation_name,
                error=_error_name(error),
                attempt=backoff.attempts,
                retry_in_seconds=round(delay, 2),
            )
            await self._poll_paused(delay)

        return await retry(
            operation,
            retriable=lambda error: isinstance(error, KafkaError),
            wait=wait,
            stopping=self.stopping,
        )

    async def _poll_paused(self, seconds: float) -> None:
        """Polls Kafka with every partition paused: the group keeps this worker as a live
        member (`max_poll_interval_ms`) and no record is consumed. During a revocation it
        only waits: the rebalance is what keeps the membership then."""
        if self._revoking:
            await asyncio.sleep(seconds)
            self.beat()
            return
        paused = self.consumer.assignment()
        self.consumer.pause(*paused)
        metrics.PAUSED_PARTITIONS.set(len(paused))
        try:
            try:
                # Bounded: a rebalance starting now holds getmany until the new assignment,
                # and the revocation listener may be waiting for this very batch.
                unexpected = await asyncio.wait_for(
                    self.consumer.getmany(timeout_ms=int(seconds * 1000)),
                    seconds + PAUSED_POLL_GRACE_SECONDS,
                )
            except TimeoutError:
                unexpected = {}  # held by a rebalance: nothing was handed out
            # A partition assigned while we waited is not paused: put back what it returned.
            for partition, records in unexpected.items():
                self.consumer.seek(partition, records[0].offset)
        finally:
            self.consumer.resume(*self.consumer.assignment())
            metrics.PAUSED_PARTITIONS.set(0)
        self.beat()

    def _backoff(self) -> Backoff:
        return Backoff(self.settings.retry_initial_seconds, self.settings.retry_max_seconds)


def _source_of(letter: DeadLetter) -> tuple[str, int, int]:
    return (letter.topic, letter.partition, letter.offset)


def _log_refused_dead_letter(refusal: Refusal) -> None:
    letter = refusal.letter
    value = letter.value or b""
    metrics.DEAD_LETTERS_FAILED.labels(letter.topic, letter.rejection.reason.value).inc()
    metrics.EVENTS.labels(letter.topic, "unknown", "dead_letter_refused").inc()
    log.error(
        "ingest.dead_letter_refused",
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


def _names(partitions: set[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions)

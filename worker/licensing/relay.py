"""The outbox relay: publishes pending license events in the order they were decided, then
marks them published. One replica at a time (the leader lease, worker/db/leases.py, checked
by every transaction of its work), so per-customer order holds,
except that an allocation waits until it has settled (`settles_at`, on the relay's clock):
events of other subjects decided after it may go first. A subject's own events keep their
order, since a decision about a subject with an unsettled allocation withdraws it or keeps
it unchanged. Each batch is read, published and marked in one transaction holding its rows:
a decision withdrawing an allocation waits for it, then finds it published.

After publishing, the leader deletes rows published more than OUTBOX_RETENTION_DAYS before
(on its clock), in bounded batches, through the SECURITY DEFINER function of migration 0013:
the topic is billing's record, and nothing reads a published row after the retention.

A crash between publishing and marking re-publishes the same rows with the same
`event_id` after restart: at least once on the topic, exactly once for a consumer that
de-duplicates by `event_id`, as billing does.

With LICENSE_EVENTS_SIGNING_KEY_FILE, every record carries `sig.key_id` and `sig.hmac` over
its key and value, exactly the bytes sent (worker/trust/license_events.py): a re-published
row is the same bytes under the same key, so it carries the same signature.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import structlog

from worker.clock import Clock, SystemClock
from worker.db.connect import connect_once
from worker.db.errors import is_no_answer, is_transient_database_error
from worker.db.leases import Leadership, LeaseLost, lease_holder
from worker.db.repository import Repository
from worker.db.session import Session
from worker.db.wait import pause, wait_to_retry
from worker.kafka.clients import create_producer, start_once
from worker.kafka.producer_errors import ProducerErrorKind, classify_producer_error
from worker.ops import metrics
from worker.ops.logs import error_fields
from worker.retry import Backoff, Stopped, always, retry
from worker.settings import Settings
from worker.trust.license_events import license_event_headers

log = structlog.get_logger(__name__)

# Pruning runs at most this often on the relay's clock while nothing is due, and deletes at
# most this many batches a pass (the rest on the next pass: publishing goes first).
PRUNE_EVERY = timedelta(minutes=1)
PRUNE_BATCHES_PER_PASS = 10


class Relay:
    def __init__(
        self,
        settings: Settings,
        repository: Repository,
        producer: Any,
        beat: Callable[[], None] = lambda: None,
        clock: Clock | None = None,
        *,
        prune: bool = True,
    ) -> None:
        self._beat = beat
        self._prune = prune
        self._clock = clock or SystemClock()
        self._settings = settings
        self._repository = repository
        self._producer = producer
        self._signing_keys = settings.license_events_signing_keys()
        self._next_prune_at: datetime | None = None
        # Kept from pass to pass: the leader stays the leader until it stops (`close`).
        self._leadership = Leadership(
            repository, "relay", lease_holder(settings.replica_id), settings.leader_lease_seconds
        )

    async def close(self) -> None:
        """Gives the relay lease up, so another replica takes over at once."""
        await self._leadership.close()

    async def run_forever(self, stopping: asyncio.Event) -> None:
        """Publishes what is pending every `relay_poll_seconds` (at once again after a pass
        that published), retrying a failed pass until it succeeds or the worker stops."""
        try:
            await self._run_until(stopping)
        finally:
            await self.close()

    async def _run_until(self, stopping: asyncio.Event) -> None:
        backoff = Backoff(self._settings.retry_initial_seconds, self._settings.retry_max_seconds)

        async def wait(error: Exception) -> None:
            # Nothing is marked that was not acknowledged. Postgres unavailable: retry as
            # soon as it answers. Kafka: back off. Even a refusal for good is retried: a
            # license event must never be dropped, and later events of the same customer
            # may not overtake it.
            if is_transient_database_error(error):
                log.warning("relay.failed", **error_fields(error))
                await wait_to_retry(
                    self._repository.answers, backoff, stopping, task="relay", beat=self._beat
                )
            else:
                delay = backoff.next_delay()
                self._report_failure(error, delay)
                await pause(stopping, delay)
            self._beat()

        while not stopping.is_set():
            self._beat()
            try:
                published = await retry(
                    self.publish_pending, retriable=always, wait=wait, stopping=stopping
                )
            except Stopped:
                return
            backoff.reset()
            if not published:
                await pause(stopping, self._settings.relay_poll_seconds)

    def _report_failure(self, error: Exception, retry_in: float) -> None:
        """An outage (Kafka or Postgres unavailable) is a warning; a refusal waiting cannot
        fix (a message too large, no authorisation on the topic) is an error, every time,
        until an operator fixes the topic or its ACLs."""
        kind = classify_producer_error(error)
        fields = {**error_fields(error), "retry_in_seconds": round(retry_in, 2)}
        if kind is ProducerErrorKind.TRANSIENT:
            metrics.RELAY_FAILURES.labels("transient").inc()
            log.warning("relay.failed", **fields)
            return
        metrics.RELAY_FAILURES.labels("permanent").inc()
        log.error(
            "relay.refused", kind=kind.value, topic=self._settings.license_events_topic, **fields
        )

    async def publish_pending(self) -> int:
        """Publishes every pending event, then prunes the outbox (while this replica holds
        the relay lease)."""
        total = 0
        lease = await self._leadership.acquire()
        if lease is None:
            self._withdraw_backlog()  # another replica relays: its figures count
            return 0
        work = self._repository.fenced(lease)
        try:
            while published := await self._publish_batch(work):
                total += published
            if self._prune:
                await self._prune_without_holding_up_publication(work)
        except LeaseLost:
            self._withdraw_backlog()  # logged as lease.lost; another replica relays now
            return total
        await self._report_backlog()
        return total

    def _withdraw_backlog(self) -> None:
        metrics.OUTBOX_PENDING.withdraw()
        metrics.OUTBOX_OLDEST_AGE.withdraw()

    async def _prune_without_holding_up_publication(self, work: Repository) -> None:
        """A prune Postgres refuses (no EXECUTE on the function: `create-roles` not run
        again after `migrate`) is logged, and tried again a PRUNE_EVERY later; publication
        goes on. An outage (no answer) is raised as any other, and retried."""
        try:
            await self.prune_published(work)
        except asyncpg.PostgresError as error:
            if is_no_answer(error):
                raise
            log.error("relay.prune_refused", **error_fields(error))
            self._next_prune_at = self._clock.now() + PRUNE_EVERY

    async def prune_published(self, work: Repository) -> int:
        """Deletes events published more than `outbox_retention_days` before the relay's
        clock, a batch per transaction, at most PRUNE_BATCHES_PER_PASS batches; then waits
        PRUNE_EVERY once nothing is left to prune. `work`: the repository fenced by the
        relay lease."""
        now = self._clock.now()
        if self._next_prune_at is not None and now < self._next_prune_at:
            return 0
        retention = timedelta(days=self._settings.outbox_retention_days)
        total = 0
        for _ in range(PRUNE_BATCHES_PER_PASS):
            async with work.transaction() as session:
                [row] = await session.fetch(
                    "prune_published_license_events",
                    now,
                    retention,
                    self._settings.outbox_prune_batch_size,
                )
            pruned = int(row["pruned"])
            metrics.OUTBOX_PRUNED.inc(pruned)
            total += pruned
            if pruned == 0:
                self._next_prune_at = now + PRUNE_EVERY
                break
        if total:
            log.info(
                "relay.pruned", rows=total, retention_days=self._settings.outbox_retention_days
            )
        return total

    async def _publish_batch(self, work: Repository) -> int:
        async with work.transaction() as session:
            rows = await session.fetch(
                "pending_license_events", self._settings.relay_batch_size, self._clock.now()
            )
            if rows:
                await self._publish(rows)
                await self._mark_published(session, rows)
        return len(rows)

    async def _publish(self, rows: list[Any]) -> None:
        deliveries = []
        for row in rows:
            key, value = row["customer_id"].encode(), row["payload"].encode()
            deliveries.append(
                await self._producer.send(
                    self._settings.license_events_topic,
                    value=value,
                    key=key,
                    headers=self._headers(str(row["event_id"]), key, value),
                )
            )
        await asyncio.gather(*deliveries)
        metrics.OUTBOX_PUBLISHED.inc(len(rows))

    def _headers(self, event_id: str, key: bytes, value: bytes) -> list[tuple[str, bytes]]:
        headers = [("event_id", event_id.encode())]
        if self._signing_keys is not None:
            headers += license_event_headers(self._signing_keys, key, value)
        return headers

    async def _mark_published(self, session: Session, rows: list[Any]) -> None:
        customers = sorted({row["customer_id"] for row in rows})
        await session.execute(
            "mark_license_events_published", [row["id"] for row in rows], customers
        )

    async def _report_backlog(self) -> None:
        [row] = await self._repository.fetch("outbox_backlog")
        metrics.OUTBOX_PENDING.set(row["pending"])
        metrics.OUTBOX_OLDEST_AGE.set(max(row["oldest_age_seconds"], 0.0))


async def publish_pending_once(
    settings: Settings, clock: Clock | None = None, *, prune: bool = False
) -> int:
    """Publishes what is pending (allocations settled by `clock`'s time) with a relay of its
    own, then closes it (CLI, tests). Prunes the outbox only when asked: `publish-events
    --now T` with a `T` ahead would otherwise delete what was published less than the
    retention ago; the relay inside `run` prunes."""
    repository = await connect_once(settings, 2)
    producer = create_producer(settings)
    try:
        await start_once("kafka-producer", producer.start, settings)
        relay = Relay(settings, repository, producer, clock=clock, prune=prune)
        try:
            return await relay.publish_pending()
        finally:
            await relay.close()
    finally:
        await producer.stop()
        await repository.close()

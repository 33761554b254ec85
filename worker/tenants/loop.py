"""Consumes the console's administrative events (`tenant.admin.v1`) with the guarantees of
the agent topics: validated, idempotent, bad input to the DLQ, offsets committed only after
the database has the changes.

The topic is small and each event can touch a whole customer, so events are applied one
transaction each, in partition order (the topic is keyed by customer). The loop has its own
consumer group, so a slow admin change never holds up agent ingestion.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import structlog

from schemas.admin_events import AdminEventModel
from worker.ingest.batch import Record, dead_letter_for
from worker.ingest.consumer_session import (
    ConsumerSession,
    FlushBeforeRevoke,
    PermanentDatabaseError,
    database_rejection,
)
from worker.ingest.dead_letters import DeadLetter
from worker.ingest.decoding import Rejection, RejectReason, decode_admin_event
from worker.licensing.decisions import count_license_changes
from worker.ops import metrics
from worker.retry import Stopped
from worker.tenants.changes import AdminOutcome, UnknownSubscription, apply_admin_event

log = structlog.get_logger(__name__)
ADMIN_BATCH_RECORDS = 200


class AdminLoop:
    """Console events, applied one transaction each; the Kafka mechanics (retries, the DLQ,
    commits, rebalances) are the consumer session's."""

    def __init__(self, session: ConsumerSession) -> None:
        self._session = session
        self._lag_reported: set[Any] = set()
        # Held while a batch of console messages is applied (never across getmany).
        self._handling = asyncio.Lock()

    def rebalance_listener(self) -> FlushBeforeRevoke:
        async def flush() -> None:
            async with self._handling:
                pass

        return self._session.rebalance_listener(flush)

    async def run(self) -> None:
        log.info("admin.started", topic=self._session.settings.admin_topic)
        try:
            await self._session.consume(ADMIN_BATCH_RECORDS, self._take)
        except Stopped:
            log.warning("admin.batch_abandoned_for_shutdown")
        log.info("admin.stopped")

    async def _take(self, records: Mapping[Any, Iterable[Record]]) -> None:
        if records:
            async with self._handling:
                await self._handle(records)
        await self._publish_lag()

    async def _publish_lag(self) -> None:
        """Console messages not yet applied, per assigned partition: the broker's end offset
        (as of the last fetch) minus our position. (Agent topics' lag is the monitor's.)"""
        consumer = self._session.consumer
        assigned = consumer.assignment()
        for gone in self._lag_reported - assigned:
            metrics.CONSUMER_LAG_MESSAGES.remove(gone.topic, str(gone.partition))
        for partition in assigned:
            end = consumer.highwater(partition)
            if end is None:
                continue
            position = await consumer.position(partition)
            metrics.CONSUMER_LAG_MESSAGES.labels(partition.topic, str(partition.partition)).set(
                max(0, end - position)
            )
        self._lag_reported = {p for p in assigned if consumer.highwater(p) is not None}

    async def _handle(self, records: Mapping[object, Iterable[Record]]) -> None:
        letters: list[DeadLetter] = []
        outcomes: Counter[tuple[str, str]] = Counter()
        next_offsets = {}
        for partition_records in records.values():
            for record in partition_records:
                decoded = decode_admin_event(record.value, self._session.settings.max_message_bytes)
                if isinstance(decoded, Rejection):
                    letters.append(dead_letter_for(record, decoded))
                else:
                    outcome = await self._apply(record, decoded)
                    if isinstance(outcome, DeadLetter):
                        letters.append(outcome)
                    else:
                        outcomes[(decoded.type, outcome.value)] += 1
                next_offsets[(record.topic, record.partition)] = record.offset + 1
        letters = await self._session.dead_letter(letters)
        await self._session.commit(next_offsets)
        topic = self._session.settings.admin_topic
        for (event_type, outcome_name), count in outcomes.items():
            metrics.EVENTS.labels(topic, event_type, outcome_name).inc(count)
        for letter in letters:
            metrics.EVENTS.labels(topic, "unknown", "dead_lettered").inc()
            metrics.DEAD_LETTERS.labels(topic, letter.rejection.reason.value).inc()

    async def _apply(self, record: Record, event: AdminEventModel) -> AdminOutcome | DeadLetter:
        async def in_transaction() -> AdminOutcome | None:
            now = self._session.clock.now()
            try:
                async with self._session.repository.transaction() as session:
                    settings = self._session.settings
                    result = await apply_admin_event(
                        session,
                        event,
                        now,
                        settings.license_window,
                        event_key=settings.event_id_key(),
                    )
            except UnknownSubscription:
                return None  # rolled back; not a database error, so no retry
            count_license_changes(result.license_changes)
            return result.outcome

        try:
            outcome = await self._session.retry_database(in_transaction)
        except PermanentDatabaseError as error:
            return database_rejection(record, error)
        if outcome is None:
            detail = "subscription.status_changed for a subscription never attached"
            return dead_letter_for(record, Rejection(RejectReason.UNKNOWN_SUBSCRIPTION, detail))
        log.info("admin.applied", type=event.type, outcome=outcome.value)
        return outcome

"""Consumes the console's administrative events (`tenant.admin.v1`) with the guarantees of
the agent topics: validated, idempotent, bad input to the DLQ, offsets committed only after
the database has the changes.

The topic is small and each event can touch a whole customer, so events are applied one
transaction each, in partition order (the topic is keyed by customer). The loop has its own
consumer group, so a slow admin change never holds up agent ingestion.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
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
from worker.licensing.sweep_rules import StoredProgress
from worker.ops import metrics
from worker.ops.lag import partition_lag
from worker.retry import Stopped
from worker.tenants.changes import AdminOutcome, UnknownSubscription, apply_admin_event
from worker.trust.signing import console_signed_bytes, signature_in, unauthenticated_reason

log = structlog.get_logger(__name__)
ADMIN_BATCH_RECORDS = 200


class AdminLoop:
    """Console events, applied one transaction each; the Kafka mechanics (retries, the DLQ,
    commits, rebalances) are the consumer session's."""

    def __init__(self, session: ConsumerSession) -> None:
        self._session = session
        self._signing_keys = session.settings.console_signing_keys()
        self._lag_reported: set[Any] = set()
        # The Kafka timestamp of the newest message applied, per partition (this process).
        self._last_applied_at: dict[Any, datetime] = {}
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
            for partition, partition_records in records.items():
                newest = max((record.timestamp for record in partition_records), default=None)
                if newest is not None:
                    self._last_applied_at[partition] = datetime.fromtimestamp(newest / 1000, UTC)
        await self._publish_lag()

    async def _publish_lag(self) -> None:
        """Console messages not yet applied, per assigned partition, as the agent topics'
        lag is measured (`worker/ops/lag.py`): the broker's end offset (as of the last fetch)
        minus our position, and while any wait, how old the newest applied message is.
        (Agent topics' lag is the monitor's.)"""
        consumer = self._session.consumer
        group = self._session.settings.admin_consumer_group
        assigned = consumer.assignment()
        for gone in self._lag_reported - assigned:
            labels = (group, gone.topic, str(gone.partition))
            metrics.CONSUMER_LAG_MESSAGES.remove(*labels)
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG_SECONDS.remove(*labels)
            self._last_applied_at.pop(gone, None)
        now = datetime.now(UTC)  # wall time, like the Kafka timestamps (not the rules' clock)
        for partition in assigned:
            end = consumer.highwater(partition)
            if end is None:
                continue
            position = await consumer.position(partition)
            applied_at = self._last_applied_at.get(partition)
            labels = (group, partition.topic, str(partition.partition))
            if applied_at is None and end > position:
                # Behind, and nothing applied by this process yet: its age is not known.
                metrics.CONSUMER_LAG_MESSAGES.labels(*labels).set(end - position)
                continue
            stored = StoredProgress(position, applied_at or now)
            lag = partition_lag(end, stored, now)
            metrics.CONSUMER_LAG_MESSAGES.labels(*labels).set(lag.messages)
            metrics.CONSUMER_LAG_SECONDS.labels(*labels).set(lag.seconds)
        self._lag_reported = {p for p in assigned if consumer.highwater(p) is not None}

    async def _handle(self, records: Mapping[object, Iterable[Record]]) -> None:
        letters: list[DeadLetter] = []
        outcomes: Counter[tuple[str, str]] = Counter()
        next_offsets = {}
        for partition_records in records.values():
            for record in partition_records:
                decoded = self._decode(record)
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

    def _decode(self, record: Record) -> AdminEventModel | Rejection:
        """The console's event; with CONSOLE_SIGNING_KEYS_FILE, only if the console signed
        its value, checked before the value is parsed."""
        if self._signing_keys is not None:
            signed = console_signed_bytes(record.value or b"")
            signature = signature_in(record.headers)
            reason = unauthenticated_reason(self._signing_keys, signature, signed)
            if reason is not None:
                return Rejection(RejectReason.UNAUTHENTICATED, reason)
        return decode_admin_event(record.value, self._session.settings.max_message_bytes)

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
                        settings.release_window,
                        settle=settings.allocation_settle,
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

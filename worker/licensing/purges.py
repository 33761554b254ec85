"""Purges the personal data of users past the retention: their identity is replaced by a
pseudonym, and billing gets a `user.purged` event for each. Devices without a user lose
their host name at the same retention (no event: billing never had it). Erasure on request
(`erasures.py`) goes through the same statements."""

from __future__ import annotations

from datetime import datetime, timedelta

from worker.clock import Clock
from worker.db.repository import Repository
from worker.db.session import LicenseRow
from worker.licensing.decisions import license_event_json
from worker.licensing.rules import Reason, SubjectType, license_event_id, purge_due_at
from worker.licensing.sweep_report import SweepReport
from worker.licensing.sweep_rules import pseudonym
from worker.ops import metrics
from worker.pseudonym_key import pseudonym_hmac_key
from worker.settings import Settings


class Purges:
    def __init__(self, settings: Settings, repository: Repository, clock: Clock) -> None:
        self._settings = settings
        self._repository = repository
        self._clock = clock

    async def purge(self, decision_time: datetime, report: SweepReport, dry_run: bool) -> None:
        """Personal data of users released longer ago than the retention, then of users who
        never held a license and have been silent for the window plus the retention."""
        due_before = decision_time - self._settings.retention
        await self._purge_due(report, dry_run, "users_due_for_purge", due_before)
        await self._purge_due(
            report,
            dry_run,
            "unlicensed_users_due_for_purge",
            due_before,
            self._settings.release_window,
        )
        await self._purge_devices_without_user(report, dry_run, due_before)

    async def _purge_due(
        self,
        report: SweepReport,
        dry_run: bool,
        query_name: str,
        due_before: datetime,
        *window: timedelta,
    ) -> None:
        """Purges the users `query_name` finds, page by page."""
        key = pseudonym_hmac_key(self._settings.required_pseudonym_key())
        page_size = self._settings.sweep_page_size
        while True:
            async with self._repository.transaction(rollback=dry_run) as session:
                due = await session.fetch(query_name, due_before, page_size, *window)
                if not due:
                    return
                purged = [
                    (
                        row["customer_id"],
                        row["user_id"],
                        pseudonym(key, row["customer_id"], row["user_id"], row["released_at"]),
                        row["released_at"],
                    )
                    for row in due
                ]
                await session.execute(
                    "purge_users",
                    [p[0] for p in purged],
                    [p[1] for p in purged],
                    [p[2] for p in purged],
                    report.now,
                )
                await session.write_license_changes(
                    [
                        self._purge_row(customer, alias, released)
                        for customer, _, alias, released in purged
                    ],
                    report.now,
                )
            report.purged += len(purged)
            if not dry_run:
                metrics.PURGES.inc(len(purged))
            if dry_run:
                return  # the rows are still there: one page shows what would happen

    async def _purge_devices_without_user(
        self, report: SweepReport, dry_run: bool, due_before: datetime
    ) -> None:
        """Host names of devices without a user whose license ended (never licensed: whose
        last signal + the window) at least the retention ago, page by page."""
        page_size = self._settings.sweep_page_size
        while True:
            async with self._repository.transaction(rollback=dry_run) as session:
                due = await session.fetch(
                    "devices_without_user_due_for_purge",
                    due_before,
                    page_size,
                    self._settings.release_window,
                )
                if not due:
                    return
                await session.execute(
                    "purge_devices",
                    [row["customer_id"] for row in due],
                    [row["device_id"] for row in due],
                    report.now,
                )
            report.purged_devices += len(due)
            if dry_run:
                return

    def _purge_row(self, customer_id: str, alias: str, released_at: datetime) -> LicenseRow:
        effective_at = purge_due_at(released_at, self._settings.retention)
        return purge_row(
            self._settings.event_id_key(),
            customer_id,
            alias,
            effective_at,
            self._clock.now(),
            event_type="user.purged",
            reason=Reason.RETENTION,
        )

    async def pseudonym_key(self) -> bytes:
        """The key of the pseudonyms, for erasure on request (the same key as the purge)."""
        return await self._pseudonym_key()

    async def _pseudonym_key(self) -> bytes:
        return pseudonym_hmac_key(self._settings.required_pseudonym_key())


def purge_row(
    event_key: bytes,
    customer_id: str,
    alias: str,
    effective_at: datetime,
    emitted_at: datetime,
    *,
    event_type: str,
    reason: Reason,
) -> LicenseRow:
    """The history row and billing event of a user's purge (`user.purged`) or erasure
    (`user.erased`), under the user's pseudonym."""
    event_id = license_event_id(
        event_key, customer_id, event_type, SubjectType.USER, alias, effective_at
    )
    payload = license_event_json(
        event_id=event_id,
        event_type=event_type,
        customer_id=customer_id,
        subject_type=SubjectType.USER.value,
        subject_id=alias,
        reason=reason.value,
        basis=None,
        effective_at=effective_at,
        emitted_at=emitted_at,
    )
    return LicenseRow(
        customer_id=customer_id,
        subject_type=SubjectType.USER.value,
        subject_id=alias,
        change="purged",
        basis="user",
        reason=reason.value,
        effective_at=effective_at,
        event_id=event_id,
        payload=payload,
    )

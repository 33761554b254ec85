"""The license sweeper: releases licenses silent past the window, purges personal data
past the retention, holds suspicious mass releases. One replica at a time (advisory lock).

It only reads the clock, calls the pure rules, writes and sleeps: the decisions are
`worker/licensing/rules.py` and `worker/licensing/sweep_rules.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import structlog

from worker.clock import Clock
from worker.db.errors import is_transient_database_error
from worker.db.repository import Repository
from worker.db.session import LicenseRow
from worker.db.wait import wait_to_retry
from worker.licensing.decisions import (
    Group,
    count_license_changes,
    decide_groups,
    groups_of_devices,
    license_event_json,
)
from worker.licensing.rules import Reason, SubjectType, license_event_id, purge_due_at
from worker.licensing.sweep_rules import (
    CustomerRisk,
    StoredProgress,
    customers_to_hold,
    ingestion_watermark,
    pseudonym,
)
from worker.licensing.usage import LicenseCount, usage_totals
from worker.ops import metrics
from worker.ops.logs import error_fields
from worker.retry import Backoff
from worker.settings import Settings
from worker.tenants.changes import subject_event

log = structlog.get_logger(__name__)
BEGINNING = datetime(1970, 1, 1, tzinfo=UTC)
LAG_REPORT_THRESHOLD = timedelta(seconds=60)
LICENSE_KINDS = [
    ("user", "user"),
    ("device", "unassigned"),
    ("device", "over_allowance"),
    ("device", "device_model"),
]
EndOffsets = Callable[[], Any]


@dataclass
class SweepReport:
    now: datetime
    dry_run: bool
    ran: bool = True
    decision_time: datetime | None = None
    waited_for_lag: bool = False
    scanned_from: datetime | None = None
    scanned_until: datetime | None = None
    released: int = 0
    basis_changed: int = 0
    purged: int = 0
    trials_activated: int = 0
    usage_snapshots: int = 0
    held_customers: list[str] = field(default_factory=list)
    applied_holds: list[str] = field(default_factory=list)

    def as_log(self) -> dict[str, Any]:
        return {name: _loggable(value) for name, value in self.__dict__.items()}


class Sweeper:
    def __init__(
        self,
        settings: Settings,
        repository: Repository,
        end_offsets: EndOffsets,
        clock: Clock,
        *,
        stopping: asyncio.Event | None = None,
        beat: Callable[[], None] = lambda: None,
    ) -> None:
        self._beat = beat
        self._settings = settings
        self._repository = repository
        self._end_offsets = end_offsets
        self._clock = clock
        self._stopping = stopping or asyncio.Event()

    async def run_forever(self) -> None:
        """Competes for the sweeper lock; the replica that holds it sweeps every interval
        until it stops or loses its database connection, then another one takes over. When
        Postgres is away, it waits until it answers and competes again at once."""
        backoff = Backoff(self._settings.retry_initial_seconds, self._settings.retry_max_seconds)
        while not self._stopping.is_set():
            try:
                another_replica_sweeps = not await self._lead_while_held()
                backoff.reset()  # led until the lock's connection was lost
            except Exception as error:
                if not is_transient_database_error(error):
                    raise
                log.warning("sweep.database_unavailable", **error_fields(error))
                another_replica_sweeps = False
            if another_replica_sweeps:
                await self._sleep(self._settings.sweep_interval_seconds)
            elif not self._stopping.is_set():
                # The lock's connection was lost, or the lock could not be asked for.
                await wait_to_retry(
                    self._repository.answers,
                    backoff,
                    self._stopping,
                    task="sweeper",
                    beat=self._beat,
                )

    async def _lead_while_held(self) -> bool:
        """Sweeps every interval while this replica holds the lock; False if another does."""
        async with self._repository.exclusive("sweeper") as lock:
            if not lock.acquired:
                return False
            log.info("sweep.leader_elected")
            while await lock.still_held() and not self._stopping.is_set():
                await self._run_logged()
                await self._sleep(self._settings.sweep_interval_seconds)
            return True

    async def _run_logged(self) -> None:
        try:
            await self._run(dry_run=False)
        except SweepInterrupted:
            log.info("sweep.interrupted_for_shutdown")
        except Exception as error:
            # A failed run is retried at the next interval; its work is idempotent.
            metrics.SWEEP_FAILURES.inc()
            log.error("sweep.failed", **error_fields(error))

    async def _sleep(self, seconds: float) -> None:
        self._beat()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def run_once(self, *, dry_run: bool = False) -> SweepReport:
        """One pass, if no other replica is sweeping (`ran` is False otherwise)."""
        async with self._repository.exclusive("sweeper") as lock:
            if not lock.acquired:
                log.info("sweep.skipped_another_replica_sweeping")
                return SweepReport(now=self._clock.now(), dry_run=dry_run, ran=False)
            return await self._run(dry_run=dry_run)

    async def _run(self, *, dry_run: bool) -> SweepReport:
        now = self._clock.now()
        report = SweepReport(now=now, dry_run=dry_run)
        started = asyncio.get_running_loop().time()
        await self._sweep(report, dry_run)
        # Independent of ingestion lag: trials end by the clock, and billing gets a snapshot
        # every day even while ingestion is behind.
        await self._end_trials(report, dry_run)
        if self._settings.usage_snapshots_enabled:
            await self._take_usage_snapshots(report, dry_run)
        duration = asyncio.get_running_loop().time() - started
        if not dry_run:
            metrics.SWEEP_LAST_SUCCESS.set(time.time())
            metrics.SWEEP_DURATION.observe(duration)
            await self._publish_totals()
        log.info("sweep.finished", duration_seconds=round(duration, 3), **report.as_log())
        return report

    async def _sweep(self, report: SweepReport, dry_run: bool) -> None:
        decision_time = await self._decision_time(report)
        if decision_time is None:
            return
        report.decision_time = decision_time
        boundary = decision_time - self._settings.license_window
        state = await self._repository.fetch("sweep_state")
        scanned_from = state[0]["scanned_until"] if state else BEGINNING
        report.scanned_from, report.scanned_until = scanned_from, max(boundary, scanned_from)
        held = await self._unconfirmed_holds()
        if boundary > scanned_from:
            held |= await self._hold_suspicious(scanned_from, boundary, held, dry_run)
            pages = self._silent_pages(scanned_from, boundary)
            await self._decide_pages(pages, held, decision_time, report, dry_run)
        report.held_customers = sorted(held)
        await self._apply_confirmed_holds(decision_time, report, dry_run)
        await self._purge(decision_time, report, dry_run)
        if not dry_run:
            await self._repository.execute("save_sweep_state", report.scanned_until, report.now)

    async def _end_trials(self, report: SweepReport, dry_run: bool) -> None:
        """Trials whose end has come turn active, each with a `subscription.activated` event.
        (A console change before the end has already moved the subscription out of trial.)"""
        async with self._repository.transaction(rollback=dry_run) as session:
            ended = await session.fetch("trials_due", report.now)
            await session.enqueue_events(
                [
                    subject_event(
                        customer_id=row["customer_id"],
                        event_type="subscription.activated",
                        subject_type="subscription",
                        subject_id=row["subscription_id"],
                        reason="trial_ended",
                        effective_at=row["trial_ends_at"],
                        emitted_at=report.now,
                        package=row["package"],
                        group_id=row["group_id"],
                        status="active",
                        previous_status="in_trial",
                        trial_ends_at=row["trial_ends_at"],
                    )
                    for row in ended
                ]
            )
        report.trials_activated = len(ended)

    async def _take_usage_snapshots(self, report: SweepReport, dry_run: bool) -> None:
        """The first pass of each UTC day sends every active customer's usage to billing."""
        day = report.now.astimezone(UTC).date()
        day_start = datetime.combine(day, datetime.min.time(), UTC)
        async with self._repository.transaction(rollback=dry_run) as session:
            counts: dict[str, list[LicenseCount]] = {}
            for row in await session.fetch("snapshot_counts", day):
                counts.setdefault(row["customer_id"], []).append(
                    LicenseCount(row["subject_type"], row["basis"], row["package"], row["licenses"])
                )
            events = [
                subject_event(
                    customer_id=customer_id,
                    event_type="usage.snapshot",
                    subject_type="customer",
                    subject_id=customer_id,
                    reason="daily",
                    effective_at=day_start,
                    emitted_at=report.now,
                    day=day.isoformat(),
                    taken_at=report.now,
                    **usage_totals(customer_counts).as_dict(),
                )
                for customer_id, customer_counts in counts.items()
            ]
            await session.enqueue_events(events)
            await session.execute(
                "record_usage_snapshots",
                [event.customer_id for event in events],
                day,
                report.now,
                [event.event_id for event in events],
            )
        report.usage_snapshots = len(events)

    async def _decision_time(self, report: SweepReport) -> datetime | None:
        """`now`, or less while ingestion is behind: our own lag must not look like silence."""
        end_offsets = await self._end_offsets()
        rows = await self._repository.fetch("ingestion_progress", list(self._settings.agent_topics))
        progress = {
            (row["topic"], row["partition"]): StoredProgress(
                row["next_offset"], row["last_message_at"]
            )
            for row in rows
        }
        watermark = ingestion_watermark(end_offsets, progress, report.now)
        lag = report.now - watermark if watermark else None
        metrics.SWEEP_INGESTION_LAG.set(lag.total_seconds() if lag else float("nan"))
        if watermark is None or lag is None or lag > LAG_REPORT_THRESHOLD:
            report.waited_for_lag = True
            metrics.SWEEP_LAG_WAITS.inc()
            log.warning(
                "sweep.waiting_for_ingestion",
                lag_seconds=lag.total_seconds() if lag else None,
                decision_time=_loggable(watermark),
            )
        return watermark

    async def _unconfirmed_holds(self) -> set[str]:
        if self._settings.guard_override:
            return set()
        holds = await self._repository.fetch("open_holds")
        return {hold["customer_id"] for hold in holds if hold["confirmed_at"] is None}

    async def _hold_suspicious(
        self, scanned_from: datetime, boundary: datetime, held: set[str], dry_run: bool
    ) -> set[str]:
        """Customers newly held by the outage guard for [scanned_from, boundary). Customers
        already held get this range added to their hold."""
        rows = await self._repository.fetch("licenses_at_risk", scanned_from, boundary)
        risks = [CustomerRisk(r["customer_id"], r["at_risk"], r["active"]) for r in rows]
        newly_held = set()
        if not self._settings.guard_override:
            for risk in customers_to_hold(
                risks, self._settings.guard_max_release_share, self._settings.guard_min_releases
            ):
                newly_held.add(risk.customer_id)
                log.warning(
                    "sweep.held_by_outage_guard",
                    customer_id=risk.customer_id,
                    at_risk=risk.at_risk,
                    active=risk.active,
                )
        metrics.SWEEP_HELD.inc(len(newly_held))
        if not dry_run:
            await self._repository.execute("extend_unconfirmed_holds", boundary)
            for risk in risks:
                if risk.customer_id in newly_held - held:
                    await self._repository.execute(
                        "hold_customer",
                        risk.customer_id,
                        scanned_from,
                        boundary,
                        risk.at_risk,
                        risk.active,
                    )
        return newly_held

    async def _silent_pages(self, start: datetime, end: datetime) -> Any:
        """Keyset pages of devices that fell silent in [start, end): bounded memory."""
        cursor: tuple[date, str, str] = (BEGINNING.date(), "", "")
        while True:
            rows = await self._repository.fetch(
                "silent_devices_page", start, end, *cursor, self._settings.sweep_page_size
            )
            if not rows:
                return
            yield rows
            last = rows[-1]
            cursor = (last["last_seen_day"], last["customer_id"], last["device_id"])

    async def _decide_pages(
        self,
        pages: Any,
        held: set[str],
        decision_time: datetime,
        report: SweepReport,
        dry_run: bool,
    ) -> None:
        async for rows in pages:
            self._beat()
            if self._stopping.is_set():
                # Stop between pages; the next run decides the rest (every page is idempotent).
                raise SweepInterrupted
            groups = {
                group
                for group in groups_of_devices(
                    (r["customer_id"], r["device_id"], r["user_id"], None) for r in rows
                )
                if group.customer_id not in held
            }
            await self._decide(groups, decision_time, report, dry_run)

    async def _decide(
        self, groups: Iterable[Group], decision_time: datetime, report: SweepReport, dry_run: bool
    ) -> None:
        async with self._repository.transaction(rollback=dry_run) as session:
            rows = await decide_groups(
                session, groups, decision_time, report.now, self._settings.license_window
            )
        report.released += sum(row.change == "released" for row in rows)
        report.basis_changed += sum(row.change == "basis_changed" for row in rows)
        if not dry_run:
            count_license_changes(rows)

    async def _apply_confirmed_holds(
        self, decision_time: datetime, report: SweepReport, dry_run: bool
    ) -> None:
        for hold in await self._repository.fetch("open_holds"):
            if hold["confirmed_at"] is None and not self._settings.guard_override:
                continue
            pages = self._customer_pages(
                hold["customer_id"], hold["from_boundary"], hold["to_boundary"]
            )
            await self._decide_pages(pages, set(), decision_time, report, dry_run)
            if not dry_run:
                await self._repository.execute("mark_hold_applied", hold["id"], report.now)
            report.applied_holds.append(hold["customer_id"])

    async def _customer_pages(self, customer_id: str, start: datetime, end: datetime) -> Any:
        cursor: tuple[date, str] = (BEGINNING.date(), "")
        while True:
            rows = await self._repository.fetch(
                "silent_devices_of_customer",
                customer_id,
                start,
                end,
                *cursor,
                self._settings.sweep_page_size,
            )
            if not rows:
                return
            yield rows
            cursor = (rows[-1]["last_seen_day"], rows[-1]["device_id"])

    async def _purge(self, decision_time: datetime, report: SweepReport, dry_run: bool) -> None:
        """Personal data of users released longer ago than the retention, then of users who
        never held a license and have been silent for the window plus the retention."""
        due_before = decision_time - self._settings.retention
        await self._purge_due(report, dry_run, "users_due_for_purge", due_before)
        await self._purge_due(
            report,
            dry_run,
            "unlicensed_users_due_for_purge",
            due_before,
            self._settings.license_window,
        )

    async def _purge_due(
        self, report: SweepReport, dry_run: bool, query_name: str, *arguments: Any
    ) -> None:
        """Purges the users `query_name` finds, page by page."""
        key = await self._pseudonym_key()
        page_size = self._settings.sweep_page_size
        while True:
            async with self._repository.transaction(rollback=dry_run) as session:
                due = await session.fetch(query_name, arguments[0], page_size, *arguments[1:])
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

    def _purge_row(self, customer_id: str, alias: str, released_at: datetime) -> LicenseRow:
        effective_at = purge_due_at(released_at, self._settings.retention)
        event_id = license_event_id(
            customer_id, "user.purged", SubjectType.USER, alias, effective_at
        )
        payload = license_event_json(
            event_id=event_id,
            event_type="user.purged",
            customer_id=customer_id,
            subject_type=SubjectType.USER.value,
            subject_id=alias,
            reason=Reason.RETENTION.value,
            basis=None,
            effective_at=effective_at,
            emitted_at=self._clock.now(),
        )
        return LicenseRow(
            customer_id=customer_id,
            subject_type=SubjectType.USER.value,
            subject_id=alias,
            change="purged",
            basis="user",
            reason=Reason.RETENTION.value,
            effective_at=effective_at,
            event_id=event_id,
            payload=payload,
        )

    async def _publish_totals(self) -> None:
        counts = {
            (row["subject_type"], row["basis"]): row["licenses"]
            for row in await self._repository.fetch("license_totals")
        }
        for subject_type, basis in LICENSE_KINDS:
            metrics.LICENSES_ACTIVE.labels(subject_type, basis).set(
                counts.get((subject_type, basis), 0)
            )
        [row] = await self._repository.fetch("customers_with_licenses")
        metrics.CUSTOMERS_LICENSED.set(row["customers"])

    async def _pseudonym_key(self) -> bytes:
        if self._settings.pseudonym_key is not None:
            return self._settings.pseudonym_key.get_secret_value().encode()
        rows = await self._repository.fetch("pseudonym_key")
        return str(rows[0]["value"]).encode()


class SweepInterrupted(Exception):
    """The worker is stopping; the run ends between pages without saving its progress."""


def _loggable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value

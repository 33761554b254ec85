"""`license-worker reconcile --from D --to D`: the license events topic, folded as billing
folds it (`billing_fold.py`), against the daily usage snapshots and `report usage --as-of`,
per customer, package and day.

Two clocks, and which one each side counts by:
- the bill: licenses held at the end of each UTC day by `effective_at` (`BillingFold.held_at`);
- what the service had decided by an instant: each subject's latest event by `emitted_at`
  (`BillingFold.known_at`). The as-of report counts the history decided by then and the
  snapshot the license rows at its `taken_at`, so the topic is compared with them on this
  clock: at the end of each day with the report, at the snapshot's `taken_at` with the
  snapshot (and the report as of that instant). The bill differs from them by decisions
  that take effect before they are made (a release through silence, a late signal): not a
  difference, and the bill is shown apart (`--bill`).

Order of reading: the database first, on one snapshot (the report's counts at every
instant, the customers with license events not published yet), then the topic up to its
end, then the outbox again for events written meanwhile. A customer's instants from the
earliest decision not on the topic on are pending, not compared.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

import orjson

from worker.db.repository import Repository
from worker.db.session import Session
from worker.kafka.clients import read_until_end
from worker.licensing.billing_fold import (
    BillingFold,
    CustomerPackage,
    SubjectAnomaly,
    UsageSnapshot,
    end_of_day,
    license_event,
    usage_snapshot,
)
from worker.report.build import totals_as_of
from worker.settings import Settings

MAX_DAYS = 3660


@dataclass(frozen=True, slots=True)
class Instant:
    """One comparison: a customer's counts at `at`, which belongs to `day` (its end, or the
    time of its snapshot)."""

    customer_id: str
    day: date
    at: datetime
    snapshot: Mapping[str, int] | None  # the day's usage.snapshot, when taken at `at`


@dataclass(frozen=True, slots=True)
class CountDifference:
    customer_id: str
    day: date
    package: str
    at: datetime
    topic: int
    snapshot: int | None  # None: no snapshot at this instant
    report: int


@dataclass(slots=True)
class DailyReconciliation:
    days: list[date]
    fold: BillingFold
    differences: list[CountDifference] = field(default_factory=list)
    anomalies: list[SubjectAnomaly] = field(default_factory=list)
    compared: int = 0
    pending: int = 0
    snapshots: int = 0
    unreadable: int = 0

    @property
    def agrees(self) -> bool:
        return not (self.differences or self.anomalies or self.unreadable)

    def bill(self) -> dict[date, Counter[CustomerPackage]]:
        return self.fold.daily_bill(self.days)


def days_between(first: date, last: date) -> list[date]:
    if last < first:
        raise ValueError("--to is before --from")
    count = (last - first).days + 1
    if count > MAX_DAYS:
        raise ValueError(f"at most {MAX_DAYS} days at a time")
    return [first + timedelta(days=n) for n in range(count)]


def instants(
    customers: Iterable[str],
    days: Iterable[date],
    snapshots: Mapping[tuple[str, date], UsageSnapshot],
) -> list[Instant]:
    """The end of every day for every customer, and every snapshot's time."""
    checks = []
    for customer_id in sorted(customers):
        for day in days:
            snapshot = snapshots.get((customer_id, day))
            if snapshot is not None:
                checks.append(Instant(customer_id, day, snapshot.taken_at, snapshot.by_package))
            checks.append(Instant(customer_id, day, end_of_day(day), None))
    return checks


def compare_counts(
    checks: Iterable[Instant],
    topic: Mapping[datetime, Counter[CustomerPackage]],
    report: Mapping[datetime, Mapping[str, Mapping[str, int]]],
    pending_from: Mapping[str, datetime],
) -> tuple[list[CountDifference], int, int]:
    """The differences, how many instants were compared and how many were pending. `topic`
    holds the fold's counts at each instant, `report` each customer's totals per package."""
    differences = []
    compared = pending = 0
    for check in checks:
        since = pending_from.get(check.customer_id)
        if since is not None and check.at >= since:
            pending += 1
            continue
        compared += 1
        on_topic = {
            package: n for (c, package), n in topic[check.at].items() if c == check.customer_id
        }
        reported = report.get(check.at, {}).get(check.customer_id, {})
        packages = set(on_topic) | set(reported) | set(check.snapshot or {})
        for package in sorted(packages):
            counts = (on_topic.get(package, 0), reported.get(package, 0))
            snapshot = None if check.snapshot is None else check.snapshot.get(package, 0)
            if counts[0] != counts[1] or (snapshot is not None and snapshot != counts[0]):
                differences.append(
                    CountDifference(
                        check.customer_id,
                        check.day,
                        package,
                        check.at,
                        counts[0],
                        snapshot,
                        counts[1],
                    )
                )
    return differences, compared, pending


async def reconcile_days(
    settings: Settings,
    repository: Repository,
    days: list[date],
    customer_id: str | None = None,
) -> DailyReconciliation:
    """Folds the topic and compares it with the snapshots and the as-of report, per day."""
    async with repository.snapshot() as session:
        taken = await session.fetch("usage_snapshot_times", days[0], days[-1], customer_id)
        moments = sorted({end_of_day(day) for day in days} | {row["taken_at"] for row in taken})
        report = {at: await _report_counts(session, customer_id, at) for at in moments}
        unpublished = await session.fetch("unpublished_license_decisions", customer_id)
    last_id = max(row["last_id"] for row in unpublished)
    pending_from = {
        row["customer_id"]: row["decided_from"] for row in unpublished if row["customer_id"]
    }
    result = DailyReconciliation(days, BillingFold())
    snapshots = await _read_topic(settings, customer_id, set(days), result)
    for row in await repository.fetch("license_decisions_written_after", customer_id, last_id):
        earlier = pending_from.get(row["customer_id"], row["decided_from"])
        pending_from[row["customer_id"]] = min(earlier, row["decided_from"])
    # A snapshot written while the topic was read (its day's first sweep) is read now.
    unread = sorted({s.taken_at for s in snapshots.values()} - set(report))
    if unread:
        async with repository.snapshot() as session:
            for at in unread:
                report[at] = await _report_counts(session, customer_id, at)
    customers = result.fold.customers() | {c for counts in report.values() for c in counts}
    customers |= {c for c, _ in snapshots}
    checks = instants(customers, days, snapshots)
    topic = result.fold.known_at(check.at for check in checks)
    result.differences, result.compared, result.pending = compare_counts(
        checks, topic, report, pending_from
    )
    result.anomalies = result.fold.anomalies()
    result.snapshots = len(snapshots)
    return result


async def _report_counts(
    session: Session, customer_id: str | None, at: datetime
) -> dict[str, dict[str, int]]:
    """`report usage --as-of at`, per customer and package."""
    totals = await totals_as_of(session, customer_id, at)
    return {
        customer: {name: package.total_licenses for name, package in usage.by_package.items()}
        for customer, usage in totals.items()
    }


async def _read_topic(
    settings: Settings, customer_id: str | None, days: set[date], result: DailyReconciliation
) -> dict[tuple[str, date], UsageSnapshot]:
    """Streams the topic into the fold; returns the first snapshot of each customer and day
    in `days` (a snapshot's id is derived from its customer and day)."""
    snapshots: dict[tuple[str, date], UsageSnapshot] = {}
    async for record in read_until_end(settings, settings.license_events_topic):
        try:
            event = orjson.loads(record.value) if record.value is not None else None
            if not isinstance(event, dict):
                raise ValueError("not a JSON object")
            if customer_id is not None and event.get("customer_id") != customer_id:
                continue
            parsed = license_event(event)
            snapshot = usage_snapshot(event) if parsed is None else None
        except ValueError:
            result.unreadable += 1
            continue
        if parsed is not None:
            result.fold.add(*parsed)
        elif snapshot is not None and snapshot.day in days:
            snapshots.setdefault((snapshot.customer_id, snapshot.day), snapshot)
    return snapshots

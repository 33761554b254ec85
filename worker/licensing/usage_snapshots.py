"""Daily usage snapshots: the first sweeper pass of each UTC day sends billing every active
customer's license counts."""

from __future__ import annotations

from datetime import UTC, datetime

from worker.db.repository import Repository
from worker.licensing.sweep_report import SweepReport
from worker.licensing.usage import LicenseCount, usage_totals
from worker.tenants.changes import subject_event


async def take_usage_snapshots(
    repository: Repository, report: SweepReport, dry_run: bool, event_key: bytes
) -> None:
    """The first pass of each UTC day sends every active customer's usage to billing (event
    ids keyed by `event_key`)."""
    day = report.now.astimezone(UTC).date()
    day_start = datetime.combine(day, datetime.min.time(), UTC)
    async with repository.transaction(rollback=dry_run) as session:
        counts: dict[str, list[LicenseCount]] = {}
        for row in await session.fetch("snapshot_counts", day):
            counts.setdefault(row["customer_id"], []).append(
                LicenseCount(row["subject_type"], row["basis"], row["package"], row["licenses"])
            )
        events = [
            subject_event(
                event_key,
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

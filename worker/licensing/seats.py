"""Seats are made visible, not enforced: each sweeper pass compares every live subscription's
licensed users with its seats and tells billing when one goes over, and when it is back
within them (docs/licensing.md, "Seats")."""

from __future__ import annotations

from worker.db.repository import Repository
from worker.db.session import Session
from worker.licensing.subscription_rules import SeatUsage, seat_crossings, seat_event_type
from worker.licensing.sweep_report import SweepReport
from worker.tenants.changes import subject_event


async def seat_usage(session: Session, customer_id: str | None = None) -> list[SeatUsage]:
    """Every live subscription with seats (of `customer_id`, or all), as used now."""
    return [
        SeatUsage(
            customer_id=row["customer_id"],
            subscription_id=row["subscription_id"],
            package=row["package"],
            group_id=row["group_id"],
            seats=row["seats"],
            used=row["used"],
            was_over=row["over_seats"],
        )
        for row in await session.fetch("seat_usage", customer_id)
    ]


async def check_seats(
    repository: Repository, report: SweepReport, dry_run: bool, event_key: bytes
) -> None:
    async with repository.transaction(rollback=dry_run) as session:
        usages = await seat_usage(session)
        crossed = seat_crossings(usages)
        await session.enqueue_events(
            [
                subject_event(
                    event_key,
                    customer_id=usage.customer_id,
                    event_type=seat_event_type(usage),
                    subject_type="subscription",
                    subject_id=usage.subscription_id,
                    reason="seats_exceeded" if usage.over else "seats_available",
                    effective_at=report.now,
                    emitted_at=report.now,
                    package=usage.package,
                    group_id=usage.group_id,
                    seats=usage.seats,
                    seats_used=usage.used,
                )
                for usage in crossed
            ]
        )
        await session.execute(
            "save_seat_state",
            [usage.customer_id for usage in crossed],
            [usage.subscription_id for usage in crossed],
            [usage.over for usage in crossed],
        )
    report.seat_crossings = len(crossed)

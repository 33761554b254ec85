"""Trials end by the clock: the sweeper turns each ended trial of an active customer active."""

from __future__ import annotations

from worker.db.repository import Repository
from worker.licensing.sweep_report import SweepReport
from worker.tenants.changes import subject_event


async def end_trials(
    repository: Repository, report: SweepReport, dry_run: bool, event_key: bytes
) -> None:
    """Trials whose end has come turn active, each with a `subscription.activated` event
    (id keyed by `event_key`). (A console change before the end has already moved the
    subscription out of trial.) An inactive customer's trials wait: they turn active once
    it is reactivated, effective then."""
    async with repository.transaction(rollback=dry_run) as session:
        ended = await session.fetch("trials_due", report.now)
        await session.enqueue_events(
            [
                subject_event(
                    event_key,
                    customer_id=row["customer_id"],
                    event_type="subscription.activated",
                    subject_type="subscription",
                    subject_id=row["subscription_id"],
                    reason="trial_ended",
                    effective_at=row["activated_at"],
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

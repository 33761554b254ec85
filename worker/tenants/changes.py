"""Applies administrative events from the MSP console inside the caller's transaction:
customers, subscriptions and group memberships, the license decisions they change, and the
events billing gets for them.

Each change is guarded by the console's event time (`occurred_at`), so a redelivered or late
message never undoes a newer one and applying the same message twice changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from schemas.admin_events import (
    AdminEventModel,
    CustomerInactivated,
    CustomerReactivated,
    CustomerUpserted,
    GroupMemberAdded,
    GroupMemberRemoved,
    SubscriptionAttached,
    SubscriptionStatusChanged,
)
from worker.db.session import LicenseRow, OutboxEvent, Session
from worker.licensing.decisions import Group, decide_groups, license_event_json
from worker.licensing.rules import SubjectType, license_event_id
from worker.licensing.subscription_rules import LIVE_STATUSES, status_event_type


class AdminOutcome(StrEnum):
    APPLIED = "applied"
    # Older than what is stored (a late or redelivered message): nothing to do.
    STALE = "stale"


class UnknownSubscription(Exception):
    """A status change for a subscription that was never attached: the message cannot be
    applied and goes to the DLQ (it can be replayed once the attachment has arrived)."""


@dataclass(frozen=True, slots=True)
class AdminResult:
    outcome: AdminOutcome
    license_changes: list[LicenseRow]


async def apply_admin_event(
    session: Session,
    event: AdminEventModel,
    now: datetime,
    window: timedelta,
    *,
    settle: timedelta = timedelta(0),
    event_key: bytes,
) -> AdminResult:
    """Applies one event; `now` is the decision time for the licenses it changes, allocations
    settle `settle` after it, and `event_key` keys the ids of the events it emits."""
    await session.execute("ensure_customer", event.customer_id)
    # Waits for the license decisions in progress for this customer, and holds off new ones
    # until this change commits: neither can decide on what the other has not written yet
    # (the customer's advisory lock; the row lock keeps the purge away).
    await session.execute("lock_customer_key", event.customer_id)
    await session.execute("lock_customer", event.customer_id)
    applier = _Applier(session, event, now, window, settle=settle, event_key=event_key)
    if isinstance(event, CustomerUpserted):
        return await applier.customer_profile(event)
    if isinstance(event, CustomerInactivated | CustomerReactivated):
        return await applier.customer_status(event)
    if isinstance(event, SubscriptionAttached):
        return await applier.subscription_attached(event)
    if isinstance(event, SubscriptionStatusChanged):
        return await applier.subscription_status(event)
    return await applier.membership(event)


class _Applier:
    def __init__(
        self,
        session: Session,
        event: AdminEventModel,
        now: datetime,
        window: timedelta,
        *,
        settle: timedelta,
        event_key: bytes,
    ) -> None:
        self._session = session
        self._event_key = event_key
        self._customer_id = event.customer_id
        self._now = now
        self._window = window
        self._settle = settle

    async def customer_profile(self, event: CustomerUpserted) -> AdminResult:
        model = event.license_model.value if event.license_model else None
        rows = await self._session.fetch(
            "update_customer_profile", event.customer_id, event.name, model, event.occurred_at
        )
        if not rows:
            return _stale()
        if rows[0]["previous_model"] == rows[0]["license_model"]:
            return _applied()
        return _applied(await self._decide_customer())

    async def customer_status(
        self, event: CustomerInactivated | CustomerReactivated
    ) -> AdminResult:
        status = "inactive" if isinstance(event, CustomerInactivated) else "active"
        rows = await self._session.fetch(
            "set_customer_status", event.customer_id, status, event.occurred_at
        )
        if not rows:
            return _stale()
        if rows[0]["previous_status"] == status:
            return _applied()
        # Releases first, then the customer event: billing reads them in this order.
        changes = await self._decide_customer()
        reason = "customer_inactivated" if status == "inactive" else "customer_reactivated"
        await self._emit(
            event.type,
            subject_type="customer",
            subject_id=event.customer_id,
            reason=reason,
            effective_at=event.occurred_at,
        )
        return _applied(changes)

    async def subscription_attached(self, event: SubscriptionAttached) -> AdminResult:
        rows = await self._session.fetch(
            "attach_subscription",
            event.customer_id,
            event.subscription_id,
            event.package.value,
            event.group_id,
            event.status.value,
            event.trial_ends_at,
            event.seats,
            event.occurred_at,
        )
        if not rows:
            return _stale()
        await self._emit(
            "subscription.attached",
            subject_type="subscription",
            subject_id=event.subscription_id,
            reason="attached",
            effective_at=event.occurred_at,
            package=event.package.value,
            group_id=event.group_id,
            status=event.status.value,
            trial_ends_at=event.trial_ends_at,
            seats=event.seats,
        )
        return _applied(await self._decide_customer())

    async def subscription_status(self, event: SubscriptionStatusChanged) -> AdminResult:
        rows = await self._session.fetch(
            "change_subscription_status",
            event.customer_id,
            event.subscription_id,
            event.status.value,
            event.trial_ends_at,
            event.occurred_at,
        )
        if not rows:
            [exists] = await self._session.fetch(
                "subscription_exists", event.customer_id, event.subscription_id
            )
            if not exists[0]:
                raise UnknownSubscription(event.subscription_id)
            return _stale()
        row = rows[0]
        previous, status = row["previous_status"], event.status.value
        event_type = status_event_type(previous, status)
        if event_type is not None:
            await self._emit(
                event_type,
                subject_type="subscription",
                subject_id=event.subscription_id,
                reason="manual",
                effective_at=event.occurred_at,
                package=row["package"],
                group_id=row["group_id"],
                status=status,
                previous_status=previous,
                trial_ends_at=row["trial_ends_at"],
            )
        if (previous in LIVE_STATUSES) == (status in LIVE_STATUSES):
            return _applied()
        return _applied(await self._decide_customer())

    async def membership(self, event: GroupMemberAdded | GroupMemberRemoved) -> AdminResult:
        member = isinstance(event, GroupMemberAdded)
        rows = await self._session.fetch(
            "set_group_membership",
            event.customer_id,
            event.group_id,
            event.user_id,
            member,
            event.occurred_at,
        )
        if not rows:
            return _stale()
        if bool(rows[0]["previous_member"]) == member:
            return _applied()
        group = Group(event.customer_id, SubjectType.USER, event.user_id)
        return _applied(await self._decide([group]))

    async def _decide_customer(self) -> list[LicenseRow]:
        rows = await self._session.fetch("decision_groups_of_customer", self._customer_id)
        groups = [
            Group(self._customer_id, SubjectType(row["subject_type"]), row["subject_id"])
            for row in rows
        ]
        return await self._decide(groups)

    async def _decide(self, groups: list[Group]) -> list[LicenseRow]:
        return await decide_groups(
            self._session,
            groups,
            self._now,
            self._now,
            self._window,
            settle=self._settle,
            event_key=self._event_key,
        )

    async def _emit(
        self,
        event_type: str,
        *,
        subject_type: str,
        subject_id: str,
        reason: str,
        effective_at: datetime,
        package: str | None = None,
        **details: object,
    ) -> None:
        await self._session.enqueue_events(
            [
                subject_event(
                    self._event_key,
                    customer_id=self._customer_id,
                    event_type=event_type,
                    subject_type=subject_type,
                    subject_id=subject_id,
                    reason=reason,
                    effective_at=effective_at,
                    emitted_at=self._now,
                    package=package,
                    **details,
                )
            ]
        )


def subject_event(
    event_key: bytes,
    *,
    customer_id: str,
    event_type: str,
    subject_type: str,
    subject_id: str,
    reason: str,
    effective_at: datetime,
    emitted_at: datetime,
    package: str | None = None,
    **details: object,
) -> OutboxEvent:
    """A subscription, customer or usage event with its deterministic id (keyed by
    `event_key`)."""
    event_id = license_event_id(
        event_key, customer_id, event_type, subject_type, subject_id, effective_at
    )
    payload = license_event_json(
        event_id=event_id,
        event_type=event_type,
        customer_id=customer_id,
        subject_type=subject_type,
        subject_id=subject_id,
        reason=reason,
        basis=None,
        effective_at=effective_at,
        emitted_at=emitted_at,
        package=package,
        **details,
    )
    return OutboxEvent(event_id, customer_id, subject_type, subject_id, payload)


def _applied(changes: list[LicenseRow] | None = None) -> AdminResult:
    return AdminResult(AdminOutcome.APPLIED, changes or [])


def _stale() -> AdminResult:
    return AdminResult(AdminOutcome.STALE, [])

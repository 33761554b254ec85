"""Applies the license rules to the users and devices a change touched, inside the caller's
transaction: lock their devices, read their licenses, decide (pure), write state, history
and outbox events together."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson

from worker.db.session import (
    BatchSubjects,
    LicenseRow,
    Session,
    SettledLicense,
    WithdrawnAllocation,
)
from worker.licensing.rules import (
    Basis,
    ChangeKind,
    CustomerTerms,
    DeviceFacts,
    HeldLicense,
    LicenseChange,
    PendingAllocation,
    Reason,
    Subject,
    SubjectType,
    license_event_id,
    settled_license_changes,
)
from worker.licensing.subscription_rules import LiveSubscription, package_attribution
from worker.ops import metrics

EVENT_TYPES = {
    ChangeKind.ALLOCATED: "license.allocated",
    ChangeKind.RELEASED: "license.released",
    ChangeKind.PACKAGE_CHANGED: "license.package_changed",
}


@dataclass(frozen=True, slots=True)
class Group:
    """The unit of a license decision: one user with all their devices, or one device
    without a user."""

    customer_id: str
    subject_type: SubjectType
    subject_id: str


async def decide_groups(
    session: Session,
    groups: Iterable[Group],
    now: datetime,
    emitted_at: datetime,
    window: timedelta,
    *,
    settle: timedelta = timedelta(0),
    event_key: bytes,
    written: BatchSubjects | None = None,
    customers_locked: bool = False,
) -> list[LicenseRow]:
    """Brings the licenses of `groups` in line with the rules as of `now`; returns what changed.
    `emitted_at` is the service's clock: an allocation's event settles `settle` after it, and
    until then a decision about its subject may withdraw or re-date it
    (`settled_license_changes`). `event_key` keys the event ids (`Settings.event_id_key()`).
    `written`: what this transaction's signal writes created (`write_signals`); a group whose
    subject they created is decided from them, without a lock or a read (`new_groups`).
    `customers_locked`: this transaction already holds the customers' shared locks (the batch
    write path takes them first), so they are not taken again."""
    groups = sorted(set(groups), key=lambda g: (g.customer_id, g.subject_type, g.subject_id))
    if not groups:
        return []
    written = written or BatchSubjects()
    created = new_groups(groups, written)
    users = [(g.customer_id, g.subject_id) for g in groups if g.subject_type is SubjectType.USER]
    lone = [(g.customer_id, g.subject_id) for g in groups if g.subject_type is SubjectType.DEVICE]
    customers = sorted({g.customer_id for g in groups})
    # The lock order at the top of sql/queries/licensing.sql: customers (a shared advisory
    # lock each, not their rows), users, devices, licenses, each in key order. A user's row is
    # the lock of its decision. The customers' rows are read after their locks are held. What
    # this transaction created is locked by its insert already.
    if not customers_locked:
        await session.execute("share_customers", customers)
    customer_rows = await session.fetch("customer_terms", customers)
    known_users = [(c, u) for c, u in users if Group(c, SubjectType.USER, u) not in created]
    known_lone = [(c, d) for c, d in lone if Group(c, SubjectType.DEVICE, d) not in created]
    user_rows = await session.lock_group_users(known_users)
    device_rows = [
        *await session.lock_group_devices(known_users, known_lone),
        *devices_of_new_groups(created, written),
    ]
    devices_by_customer: dict[str, list[DeviceFacts]] = defaultdict(list)
    for row in sorted(device_rows, key=lambda row: (row["customer_id"], row["device_id"])):
        devices_by_customer[row["customer_id"]].append(device_facts(row))
    # A subject this transaction created holds no license and no pending allocation.
    subjects = {(c, SubjectType.USER.value, u) for c, u in known_users}
    subjects |= {
        (c, SubjectType.DEVICE.value, d.device_id)
        for c, ds in devices_by_customer.items()
        for d in ds
        if not _created_device(written, c, d.device_id)
    }
    held_by_customer: dict[str, dict[Subject, HeldLicense]] = defaultdict(dict)
    for row in await session.held_licenses(sorted(subjects)):
        subject = (SubjectType(row["subject_type"]), row["subject_id"])
        held_by_customer[row["customer_id"]][subject] = held_license(row)
    pending_by_customer: dict[str, dict[Subject, PendingAllocation]] = defaultdict(dict)
    pending_rows: dict[tuple[str, Subject], Any] = {}
    for row in await session.unsettled_allocations(sorted(subjects), emitted_at):
        subject = (SubjectType(row["subject_type"]), row["subject_id"])
        allocation = pending_allocation(row)
        if allocation is None:
            continue
        pending_by_customer[row["customer_id"]][subject] = allocation
        pending_rows[(row["customer_id"], subject)] = row
    first_seen = {(row["customer_id"], row["user_id"]): row["first_seen_at"] for row in user_rows}
    first_seen |= {
        (g.customer_id, g.subject_id): written.created_users[(g.customer_id, g.subject_id)]
        for g in created
        if g.subject_type is SubjectType.USER
    }
    terms = await customer_terms(session, customer_rows, users, first_seen)
    rows: list[LicenseRow] = []
    withdrawn: list[WithdrawnAllocation] = []
    settles_at = emitted_at + settle if settle > timedelta(0) else None
    for customer_id in customers:
        pending = pending_by_customer.get(customer_id, {})
        decision = settled_license_changes(
            devices_by_customer.get(customer_id, []),
            held_by_customer.get(customer_id, {}),
            terms.get(customer_id, CustomerTerms()),
            now,
            window,
            pending=pending,
        )
        withdrawn.extend(
            withdrawn_allocation(pending_rows[(customer_id, subject)], pending[subject])
            for subject in decision.withdrawn
        )
        rows.extend(
            license_row(event_key, customer_id, change, emitted_at, settles_at)
            for change in decision.changes
        )
    await session.withdraw_allocations(withdrawn)
    await session.write_license_changes(rows, emitted_at)
    if withdrawn:
        metrics.WITHDRAWN_ALLOCATIONS.inc(len(withdrawn))
    return rows


def new_groups(groups: Iterable[Group], written: BatchSubjects) -> set[Group]:
    """The groups whose subject this transaction created: a user it inserted (every device
    of theirs is then one of the batch's relevant devices, since none was theirs before), or
    a device without a user it inserted."""
    created = set()
    for group in groups:
        key = (group.customer_id, group.subject_id)
        if group.subject_type is SubjectType.USER:
            if key in written.created_users:
                created.add(group)
        elif _created_device(written, *key):
            created.add(group)
    return created


def devices_of_new_groups(created: set[Group], written: BatchSubjects) -> list[Any]:
    """The devices of the created groups, as this transaction's device upsert left them."""
    devices = []
    for (customer_id, device_id), row in written.relevant_devices.items():
        user_id = row["user_id"]
        group = (
            Group(customer_id, SubjectType.DEVICE, device_id)
            if user_id is None
            else Group(customer_id, SubjectType.USER, user_id)
        )
        if group in created:
            devices.append(row)
    return devices


def _created_device(written: BatchSubjects, customer_id: str, device_id: str) -> bool:
    row = written.relevant_devices.get((customer_id, device_id))
    return row is not None and bool(row["created"])


async def withdraw_every_pending_allocation(
    session: Session, subjects: Sequence[tuple[str, str, str]], now: datetime
) -> int:
    """Takes back every unsettled allocation of `subjects` (customer, subject type, subject
    id), whatever the rules would decide: for a release that no signal caused (an erasure),
    billing need not hear of an allocation and its release. The caller has locked the
    subjects' licenses (`held_licenses`). Returns how many were withdrawn."""
    withdrawn = []
    for row in await session.unsettled_allocations(sorted(subjects), now):
        pending = pending_allocation(row)
        if pending is not None:
            withdrawn.append(withdrawn_allocation(row, pending))
    await session.withdraw_allocations(withdrawn)
    if withdrawn:
        metrics.WITHDRAWN_ALLOCATIONS.inc(len(withdrawn))
    return len(withdrawn)


def held_license(row: Mapping[str, Any]) -> HeldLicense:
    """A stored license row (`held_licenses`' columns) as the rules see it."""
    return HeldLicense(
        row["active"],
        Basis(row["basis"]),
        row["package"],
        row["event_sequence"],
        row["last_event_at"],
    )


def pending_allocation(row: Mapping[str, Any]) -> PendingAllocation | None:
    """An unsettled allocation (`unsettled_allocations`' columns): the change its event
    announced, and the release billing saw before it (if any). None for one that follows
    an event the history no longer shows: it cannot be withdrawn, so it settles as is."""
    event = orjson.loads(row["payload"])
    sequence = int(event["sequence"])
    change = LicenseChange(
        ChangeKind.ALLOCATED,
        SubjectType(event["subject_type"]),
        event["subject_id"],
        Basis(event["basis"]),
        Reason(event["reason"]),
        datetime.fromisoformat(event["effective_at"]),
        event.get("package"),
        sequence,
    )
    if sequence > 1 and row["settled_released_at"] is None:
        return None
    settled = None
    if sequence > 1:
        settled = HeldLicense(
            False,
            Basis(row["settled_basis"]),
            row["settled_package"],
            sequence - 1,
            row["settled_released_at"],
        )
    return PendingAllocation(change, settled)


def withdrawn_allocation(row: Mapping[str, Any], pending: PendingAllocation) -> WithdrawnAllocation:
    """A pending allocation (`unsettled_allocations`' row) to take back, and the release its
    subject returns to."""
    settled = pending.settled
    return WithdrawnAllocation(
        row["customer_id"],
        row["subject_type"],
        row["subject_id"],
        str(row["event_id"]),
        None
        if settled is None or settled.last_event_at is None
        else SettledLicense(
            settled.basis.value,
            settled.package,
            settled.last_event_at,
            row["settled_reason"],
            settled.event_sequence,
        ),
    )


def device_facts(row: Mapping[str, Any]) -> DeviceFacts:
    """The facts the rules need of a stored device row (`lock_group_devices`' columns; the
    uninstall and presence times may be absent)."""
    return DeviceFacts(
        device_id=row["device_id"],
        user_id=row["user_id"],
        kind=row["device_kind"],
        protected=row["protected"],
        first_seen_at=row["first_seen_at"],
        last_seen_at=row["last_seen_at"],
        last_uninstalled_at=row.get("last_uninstalled_at"),
        last_present_at=row.get("last_present_at"),
    )


async def customer_terms(
    session: Session,
    customer_rows: Sequence[Any],
    users: Sequence[tuple[str, str]],
    first_seen: Mapping[tuple[str, str], datetime] | None = None,
) -> dict[str, CustomerTerms]:
    """Each customer's license model, status (`customer_rows`) and package attribution for
    `users`, and when each of `users` was first seen (`first_seen`, by customer and user)."""
    users_first_seen: dict[str, dict[str, datetime]] = defaultdict(dict)
    for (customer_id, user_id), at in (first_seen or {}).items():
        users_first_seen[customer_id][user_id] = at
    customers = [row["customer_id"] for row in customer_rows]
    subscriptions: dict[str, list[LiveSubscription]] = defaultdict(list)
    for row in await session.fetch("live_subscriptions", customers):
        subscriptions[row["customer_id"]].append(LiveSubscription(row["group_id"], row["package"]))
    memberships: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    grouped = [(c, u) for c, u in users if any(s.group_id for s in subscriptions.get(c, ()))]
    if grouped:
        rows = await session.fetch(
            "group_memberships", [c for c, _ in grouped], [u for _, u in grouped]
        )
        for row in rows:
            memberships[row["customer_id"]][row["user_id"]].append(row["group_id"])
    terms = {}
    for row in customer_rows:
        customer_id = row["customer_id"]
        default_package, user_packages = package_attribution(
            subscriptions.get(customer_id, ()), memberships.get(customer_id, {})
        )
        terms[customer_id] = CustomerTerms(
            license_model=row["license_model"],
            active=row["status"] == "active",
            status_changed_at=row["status_changed_at"],
            default_package=default_package,
            user_packages=user_packages,
            user_first_seen=users_first_seen.get(customer_id, {}),
        )
    return terms


def groups_of_devices(
    devices: Iterable[tuple[str, str, str | None, str | None]],
) -> set[Group]:
    """(customer, device, user, previous user) to the groups whose decision they affect."""
    groups = set()
    for customer_id, device_id, user_id, previous_user_id in devices:
        if user_id is None:
            groups.add(Group(customer_id, SubjectType.DEVICE, device_id))
        else:
            groups.add(Group(customer_id, SubjectType.USER, user_id))
        if previous_user_id is not None and previous_user_id != user_id:
            groups.add(Group(customer_id, SubjectType.USER, previous_user_id))
    return groups


def license_row(
    event_key: bytes,
    customer_id: str,
    change: LicenseChange,
    emitted_at: datetime,
    settles_at: datetime | None = None,
) -> LicenseRow:
    """The rows of one change. `settles_at` applies to an allocation's event only."""
    event_type = EVENT_TYPES.get(change.kind)
    event_id = payload = None
    if event_type is not None:
        event_id = license_event_id(
            event_key,
            customer_id,
            event_type,
            change.subject_type,
            change.subject_id,
            change.effective_at,
            sequence=change.sequence,
        )
        payload = license_event_json(
            event_id=event_id,
            event_type=event_type,
            customer_id=customer_id,
            subject_type=change.subject_type.value,
            subject_id=change.subject_id,
            reason=change.reason.value if change.reason else None,
            basis=change.basis.value,
            package=change.package,
            effective_at=change.effective_at,
            emitted_at=emitted_at,
            sequence=change.sequence,
            **_own_fields(change),
        )
    return LicenseRow(
        customer_id=customer_id,
        subject_type=change.subject_type.value,
        subject_id=change.subject_id,
        change=change.kind.value,
        basis=change.basis.value,
        reason=change.reason.value if change.reason else None,
        effective_at=change.effective_at,
        event_id=event_id,
        payload=payload,
        package=change.package,
        event_sequence=change.sequence,
        settles_at=settles_at if change.kind is ChangeKind.ALLOCATED else None,
    )


def _own_fields(change: LicenseChange) -> dict[str, Any]:
    """The fields only one type of license event has."""
    if change.kind is ChangeKind.PACKAGE_CHANGED:
        return {"previous_package": change.previous_package}
    return {}


def license_event_json(
    *,
    event_id: str,
    event_type: str,
    customer_id: str,
    subject_type: str | None,
    subject_id: str | None,
    reason: str | None,
    basis: str | None,
    effective_at: datetime,
    emitted_at: datetime,
    package: str | None = None,
    **details: Any,
) -> str:
    """The outbound event (schemas/license_events.py) as stored in the outbox. `details`
    are the type's own fields (a subscription's status, a snapshot's counts)."""
    return orjson.dumps(
        {
            "schema_version": 1,
            "event_id": event_id,
            "type": event_type,
            "customer_id": customer_id,
            "subject_type": subject_type,
            "subject_id": subject_id,
            "reason": reason,
            "basis": basis,
            "package": package,
            "effective_at": effective_at,
            "emitted_at": emitted_at,
            **details,
        }
    ).decode()


def count_license_changes(rows: Iterable[LicenseRow]) -> None:
    for row in rows:
        metrics.LICENSE_CHANGES.labels(row.change, row.subject_type, row.reason or "").inc()

"""Erasure on request (GDPR Art. 17) and legal holds, through the purge's own statements.

A user's or a customer's erasure has two steps, because billing must learn of the releases
under the ids it knows before those ids are replaced:
1. release the subject's active licenses (reason `erasure_requested`, the subject's next
   event number, through the outbox like every license decision), then wait until the relay
   has published every event naming the user;
2. purge: the same `purge_users` statement as the 90-day purge (a keyed pseudonym in every
   table, profile data, memberships and host names gone), then the `user.erased` or
   `customer.erased` event, and the deletion receipt in `erasure_audit`.
A device's id is not personal data, so a device is erased in one transaction.

Every step refuses while a legal hold covers the subject. Locks follow the lock order at the
top of sql/queries/licensing.sql; unlike the purge, an erasure waits for its locks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

import orjson
import structlog

from worker.clock import Clock
from worker.db.repository import Repository
from worker.db.session import LicenseRow, Session
from worker.licensing.decisions import (
    Group,
    decide_groups,
    license_row,
    withdraw_every_pending_allocation,
)
from worker.licensing.erasure_rules import (
    ErasureTarget,
    Receipt,
    Scope,
    note_problem,
    removed_counts,
    subject_hash,
)
from worker.licensing.purges import Purges, purge_row
from worker.licensing.rules import (
    Basis,
    ChangeKind,
    LicenseChange,
    Reason,
    SubjectType,
)
from worker.licensing.sweep_rules import pseudonym
from worker.ops.logs import error_fields
from worker.settings import Settings
from worker.tenants.changes import subject_event

log = structlog.get_logger(__name__)

# A user who signals again between the two steps is released again, this many times.
RELEASE_ATTEMPTS = 3
RELAY_POLL_SECONDS = 0.5


class ErasureRefused(Exception):
    """The request cannot be carried out as asked; nothing was erased."""

    exit_code = 1


class UnknownSubject(ErasureRefused):
    exit_code = 4


class SubjectOnHold(ErasureRefused):
    exit_code = 5


class WaitingForRelay(ErasureRefused):
    exit_code = 6


class InvalidReason(ErasureRefused):
    exit_code = 2


class Erasures:
    def __init__(
        self,
        settings: Settings,
        repository: Repository,
        clock: Clock,
        publish: Callable[[], Awaitable[int]],
    ) -> None:
        self._settings = settings
        self._repository = repository
        self._clock = clock
        self._publish = publish
        self._purges = Purges(settings, repository, clock)

    async def erase(self, target: ErasureTarget, reason: str, wait_seconds: float) -> Receipt:
        _check_note(reason, [target.subject_id])
        if target.scope is Scope.DEVICE:
            receipt = await self._erase_device(target, reason)
        else:
            receipt = await self._erase_in_two_steps(target, reason, wait_seconds)
        await self._publish_erasure_event()
        return receipt

    async def _publish_erasure_event(self) -> None:
        """Hands billing the erasure's event now; the erasure is committed either way, and
        the relay inside `run` publishes it otherwise."""
        try:
            await self._publish()
        except Exception as error:
            log.warning("erasure.event_publication_deferred", **error_fields(error))

    async def _erase_in_two_steps(
        self, target: ErasureTarget, reason: str, wait_seconds: float
    ) -> Receipt:
        for _ in range(RELEASE_ATTEMPTS):
            async with self._repository.transaction() as session:
                released = await self._release_step(session, target, reason)
            if released:
                await self._wait_for_relay(target, wait_seconds)
            receipt = await self._purge_step(target, reason)
            if receipt is not None:
                return receipt
        raise ErasureRefused(
            f"the {target.scope.value} was licensed again by new signals while being erased: "
            "stop its agents (uninstall, or move the devices) and run the command again"
        )

    async def set_hold(self, target: ErasureTarget, reason: str) -> Receipt:
        _check_note(reason, [target.subject_id])
        async with self._repository.transaction() as session:
            await self._lock_hold_subject(session, target)
            [hold] = await session.fetch(
                "set_legal_hold", target.customer_id, target.scope.value, target.subject_id
            )
            if not hold["created"]:
                raise ErasureRefused(f"already on hold since {hold['held_at'].isoformat()}")
            return await self._audit(session, "hold_set", target, {}, reason)

    async def lift_hold(self, target: ErasureTarget, reason: str) -> Receipt:
        _check_note(reason, [target.subject_id])
        async with self._repository.transaction() as session:
            await self._lock_hold_subject(session, target, must_exist=False)
            lifted = await session.fetch(
                "lift_legal_hold", target.customer_id, target.scope.value, target.subject_id
            )
            if not lifted:
                raise UnknownSubject(f"no legal hold on this {target.scope.value}")
            return await self._audit(session, "hold_lifted", target, {}, reason)

    # -- users and customers: release, wait for the relay, purge ---------------------------

    async def _release_step(self, session: Session, target: ErasureTarget, reason: str) -> bool:
        """Step 1: releases what the subject holds; True if anything was released."""
        now = self._clock.now()
        if target.scope is Scope.USER:
            user, devices = await self._lock_user(session, target)
            _check_note(reason, [target.subject_id, user["email"], user["display_name"]])
            _check_note(reason, [device["hostname"] for device in devices])
            subjects = [(SubjectType.USER.value, target.subject_id)]
            subjects += [(SubjectType.DEVICE.value, device["device_id"]) for device in devices]
        else:
            customer = await self._lock_customer(session, target)
            _check_note(reason, [customer["customer_id"]])
            await session.execute("inactivate_customer_for_erasure", target.customer_id, now)
            rows = await session.fetch("active_licenses_of_customer", target.customer_id)
            subjects = [(row["subject_type"], row["subject_id"]) for row in rows]
        return bool(await self._release(session, target.customer_id, subjects, now))

    async def _wait_for_relay(self, target: ErasureTarget, wait_seconds: float) -> None:
        """Publishes the outbox (or lets the running worker's relay do it) until no event
        naming the user (any user of the customer) is pending."""
        user = target.subject_id if target.scope is Scope.USER else None
        deadline = asyncio.get_running_loop().time() + wait_seconds
        while True:
            await self._publish()
            [row] = await self._repository.fetch(
                "unpublished_user_events", target.customer_id, user
            )
            if row["pending"] == 0:
                return
            if asyncio.get_running_loop().time() >= deadline:
                raise WaitingForRelay(
                    "the licenses are released, but the relay has not published the releases "
                    f"within {wait_seconds:g} s; nothing was erased yet: run the command again "
                    "once license events are flowing"
                )
            await asyncio.sleep(RELAY_POLL_SECONDS)

    async def _purge_step(self, target: ErasureTarget, reason: str) -> Receipt | None:
        """Step 2; None if the subject holds a license again (a new signal): release again."""
        key = await self._purges.pseudonym_key()
        async with self._repository.transaction() as session:
            if target.scope is Scope.USER:
                removed = await self._purge_user(session, target, key)
                event = "user.erased"
            else:
                removed = await self._purge_customer(session, target, key)
                event = "customer.erased"
            if removed is None:
                return None
            return await self._audit(session, "erased", target, removed, reason, events=[event])

    async def _purge_user(
        self, session: Session, target: ErasureTarget, key: bytes
    ) -> dict[str, int] | None:
        customer_id, user_id = target.customer_id, target.subject_id
        _, devices = await self._lock_user(session, target)
        subjects = [(customer_id, SubjectType.USER.value, user_id)]
        subjects += [(customer_id, SubjectType.DEVICE.value, d["device_id"]) for d in devices]
        if any(row["active"] for row in await session.held_licenses(sorted(subjects))):
            return None
        await self._expect_published(session, customer_id, user_id)
        now = self._clock.now()
        alias = pseudonym(key, customer_id, user_id, now)
        [purged] = await session.fetch("purge_users", [customer_id], [user_id], [alias], now)
        await session.execute("detach_devices_of_users", [customer_id], [alias], now)
        erased = purge_row(
            self._settings.event_id_key(),
            customer_id,
            alias,
            now,
            now,
            event_type="user.erased",
            reason=Reason.ERASURE_REQUESTED,
        )
        await session.write_license_changes([erased], now)
        return removed_counts(dict(purged))

    async def _purge_customer(
        self, session: Session, target: ErasureTarget, key: bytes
    ) -> dict[str, int] | None:
        customer_id = target.customer_id
        await self._lock_customer(session, target)
        if await session.fetch("active_licenses_of_customer", customer_id):
            return None
        await self._expect_published(session, customer_id, None)
        now = self._clock.now()
        users = await session.fetch("lock_users_of_customer_for_erasure", customer_id)
        user_ids = [row["user_id"] for row in users]
        aliases = [pseudonym(key, customer_id, user_id, now) for user_id in user_ids]
        customers = [customer_id] * len(user_ids)
        [purged] = await session.fetch("purge_users", customers, user_ids, aliases, now)
        await session.execute("detach_devices_of_users", customers, aliases, now)
        devices = await session.fetch("lock_devices_of_customer_for_erasure", customer_id)
        scrubbed = await session.execute(
            "purge_devices", [customer_id] * len(devices), [d["device_id"] for d in devices], now
        )
        members = await session.execute("delete_group_members_of_customer", customer_id)
        # Last: from here on the triggers of migration 0009 drop the customer's rows.
        tombstone = await session.execute("mark_customer_erased", customer_id, now)
        await session.enqueue_events([self._customer_event(customer_id, "customer.erased", now)])
        return removed_counts(
            dict(purged),
            devices=_count(scrubbed),
            group_members=_count(members),
            customers=_count(tombstone),
        )

    async def _expect_published(
        self, session: Session, customer_id: str, user_id: str | None
    ) -> None:
        [row] = await session.fetch("unpublished_user_events", customer_id, user_id)
        if row["pending"]:
            raise WaitingForRelay(
                "license events naming the user are not published yet; nothing was erased: "
                "run the command again once license events are flowing"
            )

    # -- devices ----------------------------------------------------------------------------

    async def _erase_device(self, target: ErasureTarget, reason: str) -> Receipt:
        customer_id, device_id = target.customer_id, target.subject_id
        async with self._repository.transaction() as session:
            await self._share_customer(session, target)
            device = await self._lock_device(session, target)
            user_id = device["user_id"]
            # A hold on the customer, or on the device's user: "" matches no user.
            await self._refuse_if_held(session, customer_id, user_id or "")
            _check_note(reason, [device["hostname"]])
            now = self._clock.now()
            await self._release(session, customer_id, [(SubjectType.DEVICE.value, device_id)], now)
            scrubbed = await session.execute("purge_devices", [customer_id], [device_id], now)
            if user_id is not None:
                # The user's license follows from their remaining devices, by the rules.
                group = Group(customer_id, SubjectType.USER, user_id)
                window = self._settings.release_window
                await decide_groups(
                    session,
                    [group],
                    now,
                    now,
                    window,
                    settle=self._settings.allocation_settle,
                    event_key=self._settings.event_id_key(),
                )
            event = subject_event(
                self._settings.event_id_key(),
                customer_id=customer_id,
                event_type="device.erased",
                subject_type=SubjectType.DEVICE.value,
                subject_id=device_id,
                reason=Reason.ERASURE_REQUESTED.value,
                effective_at=now,
                emitted_at=now,
            )
            await session.enqueue_events([event])
            removed = {"devices": _count(scrubbed)}
            return await self._audit(
                session, "erased", target, removed, reason, events=["device.erased"]
            )

    async def _lock_device(self, session: Session, target: ErasureTarget) -> Any:
        """The device's user (if any), then the device: the lock order of every decision.
        The user is read before it is locked, so the device may have moved meanwhile: then
        again."""
        customer_id, device_id = target.customer_id, target.subject_id
        while True:
            owner = await session.fetch("device_user", customer_id, device_id)
            if not owner:
                raise UnknownSubject(f"no such device for customer {customer_id!r}")
            user_id = owner[0]["user_id"]
            if user_id is not None:
                await session.lock_group_users([(customer_id, user_id)])
            [device] = await session.fetch("lock_device_for_erasure", customer_id, device_id)
            if device["user_id"] == user_id:
                return device

    # -- shared steps -----------------------------------------------------------------------

    async def _release(
        self,
        session: Session,
        customer_id: str,
        subjects: Iterable[tuple[str, str]],
        now: datetime,
    ) -> list[LicenseRow]:
        """Releases the active licenses among `subjects` as any decision would (the
        subject's next event number, history, outbox), with reason `erasure_requested`."""
        keys = sorted(
            {(customer_id, subject_type, subject_id) for subject_type, subject_id in subjects}
        )
        if not keys:
            return []
        # Locks the licenses, then their pending allocations (the decisions' lock order): an
        # allocation billing has not received yet is withdrawn, not followed by a release.
        await session.held_licenses(keys)
        await withdraw_every_pending_allocation(session, keys, now)
        rows = [
            license_row(
                self._settings.event_id_key(),
                customer_id,
                LicenseChange(
                    ChangeKind.RELEASED,
                    SubjectType(held["subject_type"]),
                    held["subject_id"],
                    Basis(held["basis"]),
                    Reason.ERASURE_REQUESTED,
                    # Never before the subject's previous event (a package change decided
                    # on a later clock): the one rule for effective times.
                    max(now, held["last_event_at"]),
                    held["package"],
                    held["event_sequence"] + 1,
                ),
                now,
            )
            for held in await session.held_licenses(keys)
            if held["active"]
        ]
        await session.write_license_changes(rows, now)
        return rows

    async def _share_customer(self, session: Session, target: ErasureTarget) -> Any:
        await session.execute("share_customers", [target.customer_id])
        rows = await session.fetch("share_customer_for_erasure", target.customer_id)
        return _live_customer(rows, target)

    async def _lock_customer(self, session: Session, target: ErasureTarget) -> Any:
        await session.execute("lock_customer_key", target.customer_id)
        rows = await session.fetch("lock_customer_for_erasure", target.customer_id)
        customer = _live_customer(rows, target)
        await self._refuse_if_held(session, target.customer_id, None)
        return customer

    async def _lock_user(self, session: Session, target: ErasureTarget) -> tuple[Any, list[Any]]:
        """The customer (shared), the user and their devices, locked in that order."""
        customer_id, user_id = target.customer_id, target.subject_id
        await self._share_customer(session, target)
        await self._refuse_if_held(session, customer_id, user_id)
        users = await session.fetch("lock_user_for_erasure", customer_id, user_id)
        if not users:
            if not (await session.fetch("user_in_groups", customer_id, user_id))[0][0]:
                raise UnknownSubject(f"no such user for customer {customer_id!r}")
            users = [{"email": None, "display_name": None}]
        devices = await session.fetch("lock_devices_of_user_for_erasure", customer_id, user_id)
        return users[0], devices

    async def _lock_hold_subject(
        self, session: Session, target: ErasureTarget, *, must_exist: bool = True
    ) -> None:
        """A hold serialises with erasures and purges on the row they lock: the customer's
        (exclusive) for a customer, the user's for a user."""
        if target.scope is Scope.CUSTOMER:
            await session.execute("lock_customer_key", target.customer_id)
            rows = await session.fetch("lock_customer_for_erasure", target.customer_id)
            _live_customer(rows, target)
            return
        await self._share_customer(session, target)
        users = await session.fetch("lock_user_for_erasure", target.customer_id, target.subject_id)
        if must_exist and not users:
            groups = await session.fetch("user_in_groups", target.customer_id, target.subject_id)
            if not groups[0][0]:
                raise UnknownSubject(f"no such user for customer {target.customer_id!r}")

    async def _refuse_if_held(
        self, session: Session, customer_id: str, user_id: str | None
    ) -> None:
        holds = await session.fetch("holds_blocking", customer_id, user_id)
        if holds:
            scopes = sorted({row["scope"] for row in holds})
            raise SubjectOnHold(
                f"a legal hold ({', '.join(scopes)}) covers this data; nothing was erased. "
                "Lift it with `license-worker release-hold` first"
            )

    async def _audit(
        self,
        session: Session,
        action: str,
        target: ErasureTarget,
        removed: Mapping[str, int],
        reason: str,
        *,
        events: list[str] | None = None,
    ) -> Receipt:
        key = await self._purges.pseudonym_key()
        hashed = subject_hash(key, target)
        now = self._clock.now()
        [row] = await session.fetch(
            "record_erasure_audit",
            action,
            target.scope.value,
            target.customer_id,
            hashed,
            orjson.dumps(dict(removed)).decode(),
            sum(removed.values()),
            now,
            reason.strip(),
        )
        return Receipt(
            receipt_id=row["id"],
            action=action,
            scope=target.scope,
            customer_id=target.customer_id,
            subject_hash=hashed,
            removed=dict(removed),
            recorded_at=row["recorded_at"],
            requested_by=row["requested_by"],
            reason=reason.strip(),
            events=events or [],
        )

    def _customer_event(self, customer_id: str, event_type: str, now: datetime) -> Any:
        return subject_event(
            self._settings.event_id_key(),
            customer_id=customer_id,
            event_type=event_type,
            subject_type="customer",
            subject_id=customer_id,
            reason=Reason.ERASURE_REQUESTED.value,
            effective_at=now,
            emitted_at=now,
        )


def _live_customer(rows: list[Any], target: ErasureTarget) -> Any:
    if not rows:
        raise UnknownSubject(f"no such customer: {target.customer_id!r}")
    if rows[0]["erased_at"] is not None:
        raise UnknownSubject(
            f"customer {target.customer_id!r} was erased on {rows[0]['erased_at'].isoformat()}"
        )
    return rows[0]


def _check_note(reason: str, identifiers: Iterable[str | None]) -> None:
    problem = note_problem(reason, identifiers)
    if problem is not None:
        raise InvalidReason(problem)


def _count(status: str) -> int:
    """The row count of a command status (`UPDATE 3`, `DELETE 0`)."""
    return int(status.rsplit(" ", 1)[-1])

"""One connection inside one transaction: the named queries a batch, a decision or a
console change runs, and the set-based writes of signals and license changes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from worker.db.errors import ConcurrentDecisionError
from worker.db.sql_files import query
from worker.ingest.batch import PartitionProgress
from worker.ingest.coalesce import BatchChanges, DeviceChange, UserChange

# Rows a streaming cursor fetches per round trip: few enough to keep memory flat, enough to
# keep round trips from dominating.
STREAM_PREFETCH = 1000


@dataclass(frozen=True, slots=True)
class LicenseRelevantDevice:
    """A device whose change in this batch can change a license."""

    customer_id: str
    device_id: str
    user_id: str | None
    previous_user_id: str | None


@dataclass(frozen=True, slots=True)
class WrittenDevice:
    """A device as a batch left it: what the replica remembers to skip its next heartbeats
    (worker/ingest/last_seen_memory.py)."""

    customer_id: str
    device_id: str
    last_seen_at: datetime
    user_id: str | None
    device_kind: str | None
    agent_version: str | None
    protected: bool


@dataclass(frozen=True, slots=True)
class BatchSubjects:
    """What a batch's writes tell its license decisions without another read: the users it
    created, with their first sighting, and each device whose change can change a license as
    the device upsert left it (`lock_group_devices`' columns, and `created`: this transaction
    inserted it). A subject created in this transaction holds no license and no pending
    allocation, and its insert locks its row (decide_groups)."""

    created_users: dict[tuple[str, str], datetime] = field(default_factory=dict)
    relevant_devices: dict[tuple[str, str], asyncpg.Record] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SignalWriteResult:
    # (customer_id, event_id) of the lifecycle events recorded for the first time.
    inserted_lifecycle_events: set[tuple[str, str]]
    license_relevant: list[LicenseRelevantDevice]
    # Every device written, when asked for (`remember`); else empty.
    written: list[WrittenDevice] = field(default_factory=list)
    subjects: BatchSubjects = field(default_factory=BatchSubjects)


@dataclass(frozen=True, slots=True)
class LicenseRow:
    """One license change to write: state, history row and (if any) outbox event."""

    customer_id: str
    subject_type: str
    subject_id: str
    change: str
    basis: str
    reason: str | None
    effective_at: datetime
    event_id: str | None
    payload: str | None
    package: str | None = None
    # The subject's license event number this change announces (0: no event).
    event_sequence: int = 0
    # An allocation's event is published from then on (None: at once).
    settles_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class SettledLicense:
    """A released license as billing last saw it: its release's basis, package, time and
    reason, and its event number."""

    basis: str
    package: str | None
    released_at: datetime
    reason: str | None
    event_sequence: int


@dataclass(frozen=True, slots=True)
class WithdrawnAllocation:
    """A pending allocation taken back, and the state its subject returns to (None: never
    licensed)."""

    customer_id: str
    subject_type: str
    subject_id: str
    event_id: str
    settled: SettledLicense | None


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """An event for billing that is not a license change (subscription, customer, usage)."""

    event_id: str
    customer_id: str
    subject_type: str | None
    subject_id: str | None
    payload: str


class Session:
    """One connection inside one transaction. Every method runs set-based statements."""

    def __init__(self, connection: asyncpg.Connection) -> None:
        self._connection = connection

    async def fetch(self, name: str, *arguments: Any) -> list[asyncpg.Record]:
        return list(await self._connection.fetch(query(name), *arguments))

    async def execute(self, name: str, *arguments: Any) -> str:
        return str(await self._connection.execute(query(name), *arguments))

    async def stream(
        self, name: str, *arguments: Any, prefetch: int = STREAM_PREFETCH
    ) -> AsyncIterator[asyncpg.Record]:
        """The rows of a named query through a server-side cursor, `prefetch` at a time:
        memory stays bounded however many rows match. Cursors live in a transaction, which
        every session has. The cursor's statement is unnamed (`prepare`): a named one would
        outlive the transaction on PgBouncer's server connection, shared with other clients
        (docs/scaling.md, "PgBouncer")."""
        statement = await self._connection.prepare(query(name))
        cursor = statement.cursor(*arguments, prefetch=prefetch)
        async for record in cursor:
            yield record

    async def write_signals(
        self,
        changes: BatchChanges,
        progress: Sequence[PartitionProgress],
        window_start: datetime,
        *,
        create_customers: bool = True,
        recorded_at: datetime | None = None,
        remember: bool = False,
        refresh: Collection[tuple[str, str]] = (),
    ) -> SignalWriteResult:
        """`create_customers=False` (UNKNOWN_CUSTOMERS=refuse): the caller has left out the
        changes of unknown customers, and the foreign keys refuse any that would remain.
        `recorded_at`: the service's clock, stamped on the device history (None: the
        database's). `remember`: the result lists every device written (`written`).
        `refresh`: devices whose change is likely a plain last-seen move (the last-seen
        memory's `refresh_candidates`): tried with `refresh_devices` first, the others and
        those it does not apply to with `upsert_devices`."""
        connection = self._connection
        relevant: list[LicenseRelevantDevice] = []
        written: list[WrittenDevice] = []
        subjects = BatchSubjects()
        if changes.devices:
            if create_customers:
                await connection.execute(query("upsert_customers"), changes.customer_ids)
            # Before any device lock, like every transaction that decides licenses: a console
            # change to one of these customers waits for this batch, or this batch for it.
            await connection.execute(query("share_customers"), changes.customer_ids)
            created = await self._insert_new_users(changes, _users_of(changes, refresh))
            subjects.created_users.update(created)
            await self._lock_device_users(changes, created)
            subjects.created_users.update(await self._upsert_users(changes, created))
            await self._lock_devices_without_user(changes)
            devices = changes.sorted_devices()
            if refresh:
                refreshed = await self._refresh_devices(devices, refresh, window_start)
                written.extend(refreshed)
                done = {(device.customer_id, device.device_id) for device in refreshed}
                devices = [d for d in devices if (d.customer_id, d.device_id) not in done]
            if devices:
                relevant, upserted = await self._upsert_devices(
                    devices, window_start, recorded_at, remember, subjects
                )
                written.extend(upserted)
            if not remember:
                written = []
            await self._credit_device_users(changes)
        inserted = await self._insert_lifecycle(changes)
        if progress:
            await connection.execute(
                query("record_ingestion_progress"),
                *_columns(
                    sorted(progress, key=lambda p: (p.topic, p.partition)),
                    "topic partition next_offset last_message_at",
                ),
            )
        return SignalWriteResult(inserted, relevant, written, subjects)

    async def _lock_device_users(
        self, changes: BatchChanges, created: Collection[tuple[str, str]]
    ) -> None:
        """Locks, in key order and before any device, every user whose license this batch
        can change (the lock order at the top of sql/queries/licensing.sql), but those this
        transaction created: their inserts hold them."""
        devices = sorted(changes.devices)
        users = sorted(key for key in changes.users if key not in created)
        await self._connection.execute(
            query("lock_device_users"), *_key_columns(devices), *_key_columns(users)
        )

    async def _lock_devices_without_user(self, changes: BatchChanges) -> None:
        """Locks, in key order, the batch's stored devices that have no user: no user lock
        makes another replica writing the same device wait (its heartbeat and lifecycle
        partitions may be read by two replicas), and the device upsert's image of the rows
        before it must be the rows it updates."""
        await self._connection.execute(
            query("lock_devices_without_user"), *_key_columns(sorted(changes.devices))
        )

    async def _insert_new_users(
        self, changes: BatchChanges, stored: Collection[tuple[str, str]]
    ) -> dict[tuple[str, str], datetime]:
        """Creates, in key order and before any user row is locked, the batch's users not
        stored yet; returns those created, with their first sighting. `stored`: users the
        replica knows to be stored (a remembered device's user), not looked for."""
        users = [
            user
            for user in changes.sorted_users()
            if (user.customer_id, user.user_id) not in stored
        ]
        if not users:
            return {}
        rows = await self._connection.fetch(query("insert_new_users"), *_user_columns(users))
        return {(row["customer_id"], row["user_id"]): row["first_seen_at"] for row in rows}

    async def _upsert_users(
        self, changes: BatchChanges, created: Collection[tuple[str, str]]
    ) -> dict[tuple[str, str], datetime]:
        """Writes the batch's users that `_insert_new_users` did not create; returns those
        this statement created (removed in between), with their first sighting."""
        users = [
            user
            for user in changes.sorted_users()
            if (user.customer_id, user.user_id) not in created
        ]
        if not users:
            return {}
        rows = await self._connection.fetch(query("upsert_users"), *_user_columns(users))
        return {(row["customer_id"], row["user_id"]): row["first_seen_at"] for row in rows}

    async def _refresh_devices(
        self,
        devices: Sequence[DeviceChange],
        refresh: Collection[tuple[str, str]],
        window_start: datetime,
    ) -> list[WrittenDevice]:
        """The candidates that are plain last-seen moves of stored devices, written; the
        others are left to `upsert_devices`."""
        candidates = [d for d in devices if (d.customer_id, d.device_id) in refresh]
        if not candidates:
            return []
        rows = await self._connection.fetch(
            query("refresh_devices"),
            *_columns(
                candidates,
                "customer_id device_id user_id user_reported_at device_kind kind_reported_at "
                "agent_version agent_version_reported_at first_seen_at",
            ),
            window_start,
            *_columns(candidates, "last_seen_at last_present_at"),
        )
        return [WrittenDevice(*row) for row in rows]

    async def _upsert_devices(
        self,
        devices: Sequence[DeviceChange],
        window_start: datetime,
        recorded_at: datetime | None,
        remember: bool,
        subjects: BatchSubjects,
    ) -> tuple[list[LicenseRelevantDevice], list[WrittenDevice]]:
        rows = await self._connection.fetch(
            query("upsert_devices"),
            *_columns(
                devices,
                "customer_id device_id user_id user_reported_at device_kind kind_reported_at "
                "hostname os details_reported_at agent_version agent_version_reported_at "
                "first_seen_at last_seen_at last_present_at last_installed_at "
                "last_uninstalled_at",
            ),
            window_start,
            recorded_at,
            remember,
        )
        relevant = [LicenseRelevantDevice(*row[:4]) for row in rows if row["relevant"]]
        subjects.relevant_devices.update(
            ((row["customer_id"], row["device_id"]), row) for row in rows if row["relevant"]
        )
        if not remember:
            return relevant, []
        return relevant, [
            WrittenDevice(row[0], row[1], row[5], row[2], row[6], row[8], row[7]) for row in rows
        ]

    async def _credit_device_users(self, changes: BatchChanges) -> None:
        credited = [d for d in changes.sorted_devices() if d.unattributed_seen_at is not None]
        if credited:
            await self._connection.execute(
                query("credit_device_users"),
                *_columns(credited, "customer_id device_id unattributed_seen_at"),
            )

    async def _insert_lifecycle(self, changes: BatchChanges) -> set[tuple[str, str]]:
        records = changes.sorted_lifecycle()
        if not records:
            return set()
        rows = await self._connection.fetch(
            query("insert_lifecycle_events"),
            *_columns(records, "customer_id event_id device_id event_type occurred_at"),
        )
        return {(row["customer_id"], row["event_id"]) for row in rows}

    async def lock_group_users(self, users: Sequence[tuple[str, str]]) -> list[asyncpg.Record]:
        if not users:
            return []
        return list(await self._connection.fetch(query("lock_group_users"), *_key_columns(users)))

    async def lock_group_devices(
        self, users: Sequence[tuple[str, str]], devices: Sequence[tuple[str, str]]
    ) -> list[asyncpg.Record]:
        if not users and not devices:
            return []
        return list(
            await self._connection.fetch(
                query("lock_group_devices"), *_key_columns(users), *_key_columns(devices)
            )
        )

    async def held_licenses(self, subjects: Sequence[tuple[str, str, str]]) -> list[asyncpg.Record]:
        if not subjects:
            return []
        return list(
            await self._connection.fetch(
                query("held_licenses"),
                [subject[0] for subject in subjects],
                [subject[1] for subject in subjects],
                [subject[2] for subject in subjects],
            )
        )

    async def enqueue_events(self, events: Sequence[OutboxEvent | LicenseRow]) -> None:
        """Adds events to the outbox the relay publishes; an event id already there is
        skipped. The one way into the outbox: license changes come through here too."""
        if events:
            await self._connection.execute(
                query("enqueue_license_events"),
                *_columns(events, "event_id customer_id subject_type subject_id payload"),
                [getattr(event, "settles_at", None) for event in events],
            )

    async def unsettled_allocations(
        self, subjects: Sequence[tuple[str, str, str]], now: datetime
    ) -> list[asyncpg.Record]:
        """The subjects' allocations still in their settle window at `now`, locked."""
        if not subjects:
            return []
        return list(
            await self._connection.fetch(
                query("unsettled_allocations"),
                [subject[0] for subject in subjects],
                [subject[1] for subject in subjects],
                [subject[2] for subject in subjects],
                now,
            )
        )

    async def withdraw_allocations(self, withdrawn: Sequence[WithdrawnAllocation]) -> None:
        """Takes back allocations billing never received: their outbox and history rows go,
        and each subject's license returns to the state billing last saw (none, or its
        release) with that event number. Locked by `held_licenses` and
        `unsettled_allocations` in this transaction."""
        if not withdrawn:
            return
        in_order = sorted(withdrawn, key=lambda w: (w.customer_id, w.subject_type, w.subject_id))
        connection = self._connection
        restored = [w for w in in_order if w.settled is not None]
        if restored:
            await connection.execute(
                query("restore_released_licenses"),
                *_columns(restored, "customer_id subject_type subject_id"),
                [w.settled.basis for w in restored if w.settled],
                [w.settled.package for w in restored if w.settled],
                [w.settled.released_at for w in restored if w.settled],
                [w.settled.reason for w in restored if w.settled],
                [w.settled.event_sequence for w in restored if w.settled],
            )
        rows = await connection.fetch(
            query("withdraw_license_events"), [w.event_id for w in in_order]
        )
        if len(rows) != len(in_order):
            raise ConcurrentDecisionError(
                f"{len(in_order) - len(rows)} of {len(in_order)} withdrawn allocations were "
                "published meanwhile"
            )

    async def write_license_changes(self, rows: Sequence[LicenseRow], decided_at: datetime) -> None:
        connection = self._connection
        # Each statement in key order (the lock order at the top of sql/queries/licensing.sql).
        in_order = sorted(rows, key=lambda row: (row.customer_id, row.subject_type, row.subject_id))
        allocated = [row for row in in_order if row.change == "allocated"]
        released = [row for row in in_order if row.change == "released"]
        repackaged = [row for row in in_order if row.change == "package_changed"]
        rebased = [row for row in in_order if row.change == "basis_changed"]
        if allocated:
            written = await connection.fetch(
                query("allocate_licenses"),
                *_columns(
                    allocated,
                    "customer_id subject_type subject_id basis effective_at reason package "
                    "event_sequence",
                ),
            )
            _expect_decided(allocated, written)
        if released:
            written = await connection.fetch(
                query("release_licenses"),
                *_columns(
                    released,
                    "customer_id subject_type subject_id effective_at reason event_sequence",
                ),
            )
            _expect_decided(released, written)
        if repackaged:
            written = await connection.fetch(
                query("change_license_packages"),
                *_columns(
                    repackaged, "customer_id subject_type subject_id basis package event_sequence"
                ),
            )
            _expect_decided(repackaged, written)
        if rebased:
            await connection.execute(
                query("reattribute_licenses"),
                *_columns(rebased, "customer_id subject_type subject_id basis package"),
            )
        if rows:
            await connection.execute(
                query("append_license_history"),
                *_columns(
                    rows,
                    "customer_id subject_type subject_id change basis reason effective_at package",
                ),
                decided_at,
                *_columns(rows, "event_id payload settles_at"),
            )


def _expect_decided(rows: Sequence[LicenseRow], written: Sequence[asyncpg.Record]) -> None:
    """Each allocation, release or package change is written only over the state it was
    decided from (the subject's event number just before it); one that was not raced with
    another decision."""
    if len(written) != len(rows):
        raise ConcurrentDecisionError(
            f"{len(rows) - len(written)} of {len(rows)} license changes were decided on a "
            "state another transaction has changed since"
        )


def _key_columns(keys: Sequence[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """The two column arrays of (customer_id, id) keys, for an `unnest($n, $n+1)`."""
    return [customer for customer, _ in keys], [key for _, key in keys]


def _columns(rows: Sequence[Any], names: str) -> list[list[Any]]:
    """Column arrays for an `unnest(...)` statement, in the order the names are given."""
    return [[getattr(row, name) for row in rows] for name in names.split()]


def _user_columns(users: Sequence[UserChange]) -> list[list[Any]]:
    """The column arrays of insert_new_users and upsert_users."""
    return _columns(
        users,
        "customer_id user_id email display_name profile_reported_at first_seen_at last_seen_at",
    )


def _users_of(changes: BatchChanges, devices: Collection[tuple[str, str]]) -> set[tuple[str, str]]:
    """The users the batch names for these of its devices."""
    return {
        (change.customer_id, change.user_id)
        for key, change in changes.devices.items()
        if key in devices and change.user_id is not None
    }

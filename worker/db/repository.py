"""All database access. Nothing else in the worker imports asyncpg."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import structlog

from worker.db.sql_files import Migration, query, role_setup_queries
from worker.db.wait import DatabaseAnswers
from worker.ingest.batch import PartitionProgress
from worker.ingest.coalesce import BatchChanges

log = structlog.get_logger(__name__)

# Errors after which the same statement can succeed later: the server went away, is
# starting or shutting down, or the transaction lost a race; or the server refused the role
# itself (class 28: a wrong or rotated password; 42501: a missing grant), which an operator
# fixes without the data changing, so it must never send messages to the DLQ. Anything else
# is a property of the data and retrying it would block the partition forever.
_TRANSIENT_SQLSTATE_CLASSES = ("08", "28", "53", "57", "58")
_TRANSIENT_SQLSTATES = {"40001", "40P01", "55P03", "42501"}


_CONNECTION_ERRORS = (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError)
# SQLSTATE classes of a server that is not there for us: connection exceptions (08) and
# operator intervention (57: shutting down, 57P01; starting up, 57P03).
_NO_ANSWER_SQLSTATE_CLASSES = ("08", "57")

# How long the outage probe may take: a connection and `SELECT 1` take milliseconds when the
# server is up.
PROBE_TIMEOUT_SECONDS = 1.0

# Rows a streaming cursor fetches per round trip: few enough to keep memory flat, enough to
# keep round trips from dominating.
STREAM_PREFETCH = 1000


class DatabaseAccessRefused(Exception):
    """Postgres answered at start-up, but will not let us in with this configuration."""


def database_refusal(error: BaseException) -> str | None:
    """What an operator must fix when connecting at start-up failed with `error`: rejected
    credentials or an untrusted server certificate. None when waiting may help. (Once
    running, the same errors are waited out: a password rotated mid-flight, say.)"""
    if isinstance(error, ssl.SSLCertVerificationError):
        return (
            "Postgres's TLS certificate is not trusted "
            f"({error.verify_message}): check sslrootcert and the host name in DATABASE_URL"
        )
    sqlstate = getattr(error, "sqlstate", None) or ""
    if isinstance(error, asyncpg.PostgresError) and sqlstate.startswith("28"):
        return (
            f"Postgres rejected the login (SQLSTATE {sqlstate}): check the user in "
            "DATABASE_URL and its password (DATABASE_URL or DATABASE_PASSWORD_FILE)"
        )
    return None


def is_transient_database_error(error: BaseException) -> bool:
    """Whether the same statement can succeed later (see the SQLSTATEs above). Every way of
    losing the server is: connection refused or reset (OSError), a timeout, the pool's or
    the driver's "connection is closed" (InterfaceError, 08003), starting up or shutting down
    (57P03, 57P01), and the driver losing track of a connection the server dropped
    mid-statement ("cannot switch to state ...; another operation is in progress":
    InternalClientError), which never depends on the data. So is a license decision raced by
    another one (ConcurrentDecisionError): it is made again from the new state."""
    if isinstance(
        error,
        OSError
        | asyncio.TimeoutError
        | asyncpg.InterfaceError
        | asyncpg.InternalClientError
        | ConcurrentDecisionError,
    ):
        return True
    if isinstance(error, asyncpg.PostgresError):
        sqlstate = getattr(error, "sqlstate", None) or ""
        return sqlstate in _TRANSIENT_SQLSTATES or sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES
    return False


def is_no_answer(error: BaseException) -> bool:
    """Whether `error` says the server is not there (down, starting, shutting down, the
    connection lost), rather than that it answered and refused (credentials, certificate,
    too many connections, a statement)."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return False
    if isinstance(error, OSError | TimeoutError | asyncpg.InterfaceError):
        return True
    sqlstate = getattr(error, "sqlstate", None) or ""
    return isinstance(error, asyncpg.PostgresError) and sqlstate[:2] in _NO_ANSWER_SQLSTATE_CLASSES


async def database_answers(database_url: str) -> bool:
    """The outage probe: whether the server behind `database_url` answers at all, on a fresh
    connection (never one of a pool's) within PROBE_TIMEOUT_SECONDS. A refusal is an answer."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
            connection = await asyncpg.connect(database_url)
            try:
                await connection.fetchval("SELECT 1")
            finally:
                await connection.close()
    except Exception as error:
        return not is_no_answer(error)
    return True


@dataclass(frozen=True, slots=True)
class LicenseRelevantDevice:
    """A device whose change in this batch can change a license."""

    customer_id: str
    device_id: str
    user_id: str | None
    previous_user_id: str | None


@dataclass(frozen=True, slots=True)
class SignalWriteResult:
    # (customer_id, event_id) of the lifecycle events recorded for the first time.
    inserted_lifecycle_events: set[tuple[str, str]]
    license_relevant: list[LicenseRelevantDevice]


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
        every session has."""
        cursor = self._connection.cursor(query(name), *arguments, prefetch=prefetch)
        async for record in cursor:
            yield record

    async def write_signals(
        self,
        changes: BatchChanges,
        progress: Sequence[PartitionProgress],
        window_start: datetime,
    ) -> SignalWriteResult:
        connection = self._connection
        relevant: list[LicenseRelevantDevice] = []
        if changes.devices:
            await connection.execute(query("upsert_customers"), changes.customer_ids)
            # Before any device lock, like every transaction that decides licenses: a console
            # change to one of these customers waits for this batch, or this batch for it.
            await connection.execute(query("share_customers"), changes.customer_ids)
            await self._lock_device_users(changes)
            await self._upsert_users(changes)
            relevant = await self._upsert_devices(changes, window_start)
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
        return SignalWriteResult(inserted, relevant)

    async def _lock_device_users(self, changes: BatchChanges) -> None:
        """Locks, in key order and before any device, every user whose license this batch
        can change (the lock order at the top of sql/queries.sql)."""
        devices, users = sorted(changes.devices), sorted(changes.users)
        await self._connection.execute(
            query("lock_device_users"),
            [customer for customer, _ in devices],
            [device for _, device in devices],
            [customer for customer, _ in users],
            [user for _, user in users],
        )

    async def _upsert_users(self, changes: BatchChanges) -> None:
        users = changes.sorted_users()
        if users:
            await self._connection.execute(
                query("upsert_users"),
                *_columns(
                    users,
                    "customer_id user_id email display_name profile_reported_at "
                    "first_seen_at last_seen_at",
                ),
            )

    async def _upsert_devices(
        self, changes: BatchChanges, window_start: datetime
    ) -> list[LicenseRelevantDevice]:
        rows = await self._connection.fetch(
            query("upsert_devices"),
            *_columns(
                changes.sorted_devices(),
                "customer_id device_id user_id user_reported_at device_kind kind_reported_at "
                "hostname os details_reported_at agent_version agent_version_reported_at "
                "first_seen_at last_seen_at last_present_at last_installed_at "
                "last_uninstalled_at",
            ),
            window_start,
        )
        return [LicenseRelevantDevice(*row) for row in rows]

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

    async def lock_group_users(self, users: Sequence[tuple[str, str]]) -> None:
        await self._connection.execute(
            query("lock_group_users"),
            [customer for customer, _ in users],
            [user for _, user in users],
        )

    async def lock_group_devices(
        self, users: Sequence[tuple[str, str]], devices: Sequence[tuple[str, str]]
    ) -> list[asyncpg.Record]:
        return list(
            await self._connection.fetch(
                query("lock_group_devices"),
                [customer for customer, _ in users],
                [user for _, user in users],
                [customer for customer, _ in devices],
                [device for _, device in devices],
            )
        )

    async def held_licenses(self, subjects: Sequence[tuple[str, str, str]]) -> list[asyncpg.Record]:
        return list(
            await self._connection.fetch(
                query("held_licenses"),
                [subject[0] for subject in subjects],
                [subject[1] for subject in subjects],
                [subject[2] for subject in subjects],
            )
        )

    async def enqueue_events(self, events: Sequence[OutboxEvent]) -> None:
        if events:
            await self._connection.execute(
                query("enqueue_license_events"),
                *_columns(events, "event_id customer_id subject_type subject_id payload"),
            )

    async def write_license_changes(self, rows: Sequence[LicenseRow], decided_at: datetime) -> None:
        connection = self._connection
        # Each statement in key order (the lock order at the top of sql/queries.sql).
        in_order = sorted(rows, key=lambda row: (row.customer_id, row.subject_type, row.subject_id))
        allocated = [row for row in in_order if row.change == "allocated"]
        released = [row for row in in_order if row.change == "released"]
        rebased = [row for row in in_order if row.change in ("basis_changed", "package_changed")]
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
        if rebased:
            await connection.execute(
                query("reattribute_licenses"),
                *_columns(rebased, "customer_id subject_type subject_id basis package"),
            )
        if rows:
            history = _columns(
                rows,
                "customer_id subject_type subject_id change basis reason effective_at package",
            )
            await connection.execute(
                query("append_license_history"),
                *history,
                [decided_at] * len(rows),
                [row.event_id for row in rows],
            )
        events = [row for row in rows if row.event_id is not None]
        if events:
            await connection.execute(
                query("enqueue_license_events"),
                *_columns(events, "event_id customer_id subject_type subject_id payload"),
            )


class ConcurrentDecisionError(Exception):
    """Another transaction changed a license between this one's read and its write: the
    decision was made on stale facts. Transient: the batch is decided again."""


def _expect_decided(rows: Sequence[LicenseRow], written: Sequence[asyncpg.Record]) -> None:
    """Each allocation or release is written only over the state it was decided from (the
    subject's event number just before it); one that was not raced with another decision."""
    if len(written) != len(rows):
        raise ConcurrentDecisionError(
            f"{len(rows) - len(written)} of {len(rows)} license changes were decided on a "
            "state another transaction has changed since"
        )


class ClusterLock:
    def __init__(self, connection: asyncpg.Connection, name: str) -> None:
        self._connection = connection
        self._name = name
        self.acquired = False

    async def try_acquire(self) -> bool:
        self.acquired = bool(await self._connection.fetchval(query(f"try_lock_{self._name}")))
        return self.acquired

    async def still_held(self) -> bool:
        if not self.acquired:
            return False
        try:
            await self._connection.fetchval("SELECT 1")
        except _CONNECTION_ERRORS:
            self.acquired = False
        return self.acquired

    async def release(self) -> None:
        if self.acquired and not self._connection.is_closed():
            with contextlib.suppress(*_CONNECTION_ERRORS):
                await self._connection.fetchval(query(f"unlock_{self._name}"))
        self.acquired = False


class Repository:
    def __init__(self, pool: asyncpg.Pool, database_url: str) -> None:
        self._pool = pool
        # What the loops that use this pool wait on after a transient error.
        self.answers = DatabaseAnswers(lambda: database_answers(database_url))

    @classmethod
    async def connect(cls, database_url: str, pool_size: int) -> Repository:
        pool = await asyncpg.create_pool(
            database_url,
            min_size=1,
            max_size=pool_size,
            command_timeout=60,
            # Statements are few and fixed; keep them prepared per connection.
            statement_cache_size=64,
            # ...but plan them on every execution: a generic plan made while a table was small
            # (a fresh database, a new customer's fleet) keeps sequential scans long after
            # the table grew, until autovacuum happens to analyze it. Planning costs far less
            # than a batch statement.
            server_settings={"plan_cache_mode": "force_custom_plan"},
        )
        return cls(pool, database_url)

    async def close(self) -> None:
        await self._pool.close()

    async def ping(self) -> None:
        async with self._pool.acquire() as connection:
            await connection.fetchval("SELECT 1")

    @contextlib.asynccontextmanager
    async def transaction(self, *, rollback: bool = False) -> AsyncIterator[Session]:
        """A session whose writes commit together when the block ends, or not at all.
        `rollback=True` undoes them at the end (dry runs)."""
        async with self._pool.acquire() as connection:
            transaction = connection.transaction()
            await transaction.start()
            try:
                yield Session(connection)
            except BaseException:
                await transaction.rollback()
                raise
            if rollback:
                await transaction.rollback()
            else:
                await transaction.commit()

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[Session]:
        """A read-only session on one snapshot of the database (repeatable read): every
        query in the block sees the same data, however long the block takes (a report's
        totals and its detail rows agree while the worker goes on writing)."""
        async with (
            self._pool.acquire() as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            yield Session(connection)

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[ClusterLock]:
        """Tries the named cluster-wide lock (`sweeper`, `relay`) for the block. The lock
        lives on its own connection and dies with it, so a crashed holder never blocks the
        others; `ClusterLock.still_held()` tells whether that connection is still alive."""
        async with self._pool.acquire() as connection:
            lock = ClusterLock(connection, name)
            await lock.try_acquire()
            try:
                yield lock
            finally:
                await lock.release()

    async def fetch(self, name: str, *arguments: Any) -> list[asyncpg.Record]:
        """Runs a named read-only query outside any explicit transaction."""
        async with self._pool.acquire() as connection:
            return list(await connection.fetch(query(name), *arguments))

    async def execute(self, name: str, *arguments: Any) -> str:
        async with self._pool.acquire() as connection:
            return str(await connection.execute(query(name), *arguments))

    async def summary(self) -> dict[str, Any]:
        async with self._pool.acquire() as connection:
            row = await connection.fetchrow(query("summary"))
        return dict(row)

    async def apply_migrations(self, migrations: Sequence[Migration]) -> list[Migration]:
        """Applies the migrations not yet recorded, each in its own transaction, under an
        advisory lock so concurrent `migrate` runs apply every file once."""
        async with self._pool.acquire() as connection:
            await connection.execute(query("lock_migrations"))
            try:
                await connection.execute(query("create_migrations_table"))
                await connection.execute(query("keep_migrations_table_private"))
                return await _apply_missing(connection, migrations)
            except asyncpg.InsufficientPrivilegeError as error:
                role = connection.get_settings().session_authorization
                raise MigrationNotPermittedError(role, error) from error
            finally:
                await connection.execute(query("unlock_migrations"))

    async def set_up_roles(
        self, owner: str, worker: str, owner_verifier: str, worker_verifier: str
    ) -> None:
        """Runs sql/roles/create_roles.sql in one transaction: creates the two roles if
        missing, sets the passwords whose verifiers are given ("" leaves one unchanged), and
        grants each role what it needs in this database, and nothing more."""
        blocks = role_setup_queries()
        async with self._pool.acquire() as connection, connection.transaction():
            try:
                await connection.execute(
                    blocks["choose_roles"], owner, worker, owner_verifier, worker_verifier
                )
                for name in ("create_roles", "grant_database_access", "grant_schema_access"):
                    await connection.execute(blocks[name])
            except asyncpg.PostgresError as error:
                raise RoleSetupRefusedError(str(error)) from error


async def _apply_missing(
    connection: asyncpg.Connection, migrations: Sequence[Migration]
) -> list[Migration]:
    applied = {row["version"]: row for row in await connection.fetch(query("applied_migrations"))}
    newly_applied = []
    for migration in migrations:
        recorded = applied.get(migration.version)
        if recorded is not None:
            if recorded["checksum"] != migration.checksum:
                raise MigrationChangedError(migration)
            continue
        async with connection.transaction():
            await connection.execute(migration.sql)
            await connection.execute(
                query("record_migration"), migration.version, migration.name, migration.checksum
            )
        log.info("migration.applied", version=migration.version, name=migration.name)
        newly_applied.append(migration)
    return newly_applied


class MigrationChangedError(RuntimeError):
    def __init__(self, migration: Migration) -> None:
        super().__init__(
            f"migration {migration.version:04d}_{migration.name} was changed after it was "
            "applied; add a new migration instead of editing an applied one"
        )


class MigrationNotPermittedError(RuntimeError):
    def __init__(self, role: str, error: BaseException) -> None:
        super().__init__(
            f"role {role} may not change the schema ({error}); run migrate with the owner "
            "role's credentials (see `license-worker create-roles`)"
        )


class RoleSetupRefusedError(RuntimeError):
    """Postgres refused to create or grant the roles: not a superuser, or a role in the way."""


def _columns(rows: Sequence[Any], names: str) -> list[list[Any]]:
    """Column arrays for an `unnest(...)` statement, in the order the names are given."""
    return [[getattr(row, name) for row in rows] for name in names.split()]

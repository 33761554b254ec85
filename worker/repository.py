"""All database access. Nothing else in the worker imports asyncpg."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog

from worker.batch import PartitionProgress
from worker.coalesce import BatchChanges
from worker.sql_files import Migration, query

log = structlog.get_logger(__name__)

# Errors after which the same statement can succeed later: the server went away, is
# starting or shutting down, or the transaction lost a race. Anything else is a property of
# the data and retrying it would block the partition forever.
_TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57", "58")
_TRANSIENT_SQLSTATES = {"40001", "40P01", "55P03"}


def is_transient_database_error(error: BaseException) -> bool:
    if isinstance(error, OSError | asyncio.TimeoutError | asyncpg.InterfaceError):
        return True
    if isinstance(error, asyncpg.PostgresError):
        sqlstate = getattr(error, "sqlstate", None) or ""
        return sqlstate in _TRANSIENT_SQLSTATES or sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES
    return False


@dataclass(frozen=True, slots=True)
class WriteResult:
    # (customer_id, event_id) of the lifecycle events recorded for the first time.
    inserted_lifecycle_events: set[tuple[str, str]]


class Repository:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def connect(cls, database_url: str, pool_size: int) -> Repository:
        pool = await asyncpg.create_pool(
            database_url,
            min_size=1,
            max_size=pool_size,
            command_timeout=60,
            # Statements are few and fixed; keep their plans prepared per connection.
            statement_cache_size=64,
        )
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    async def ping(self) -> None:
        async with self._pool.acquire() as connection:
            await connection.fetchval("SELECT 1")

    async def write_batch(
        self, changes: BatchChanges, progress: Sequence[PartitionProgress]
    ) -> WriteResult:
        """One transaction for the whole batch, so a crash leaves all of it or none."""
        async with self._pool.acquire() as connection, connection.transaction():
            if changes.devices:
                await connection.execute(query("upsert_customers"), changes.customer_ids)
                await self._upsert_users(connection, changes)
                await self._upsert_devices(connection, changes)
                await self._credit_device_users(connection, changes)
            inserted = await self._insert_lifecycle(connection, changes)
            await self._record_progress(connection, progress)
        return WriteResult(inserted_lifecycle_events=inserted)

    async def _upsert_users(self, connection: asyncpg.Connection, changes: BatchChanges) -> None:
        users = changes.sorted_users()
        if not users:
            return
        await connection.execute(
            query("upsert_users"),
            *_columns(
                users,
                "customer_id user_id email display_name profile_reported_at "
                "first_seen_at last_seen_at",
            ),
        )

    async def _upsert_devices(self, connection: asyncpg.Connection, changes: BatchChanges) -> None:
        await connection.execute(
            query("upsert_devices"),
            *_columns(
                changes.sorted_devices(),
                "customer_id device_id user_id user_reported_at device_kind kind_reported_at "
                "hostname os details_reported_at agent_version agent_version_reported_at "
                "first_seen_at last_seen_at last_present_at last_installed_at "
                "last_uninstalled_at",
            ),
        )

    async def _credit_device_users(
        self, connection: asyncpg.Connection, changes: BatchChanges
    ) -> None:
        credited = [d for d in changes.sorted_devices() if d.unattributed_seen_at is not None]
        if credited:
            await connection.execute(
                query("credit_device_users"),
                *_columns(credited, "customer_id device_id unattributed_seen_at"),
            )

    async def _insert_lifecycle(
        self, connection: asyncpg.Connection, changes: BatchChanges
    ) -> set[tuple[str, str]]:
        records = changes.sorted_lifecycle()
        if not records:
            return set()
        rows = await connection.fetch(
            query("insert_lifecycle_events"),
            *_columns(records, "customer_id event_id device_id event_type occurred_at"),
        )
        return {(row["customer_id"], row["event_id"]) for row in rows}

    async def _record_progress(
        self, connection: asyncpg.Connection, progress: Sequence[PartitionProgress]
    ) -> None:
        if progress:
            await connection.execute(
                query("record_ingestion_progress"),
                *_columns(progress, "topic partition next_offset last_message_at"),
            )

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
                return await _apply_missing(connection, migrations)
            finally:
                await connection.execute(query("unlock_migrations"))


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


def _columns(rows: Sequence[Any], names: str) -> list[list[Any]]:
    """Column arrays for an `unnest(...)` statement, in the order the names are given."""
    return [[getattr(row, name) for row in rows] for name in names.split()]


__all__ = ["PartitionProgress", "Repository", "WriteResult", "is_transient_database_error"]

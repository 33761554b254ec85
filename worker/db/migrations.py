"""The migration runner: applies the files of sql/migrations/ not applied yet, each once,
and refuses to go on when an applied one was edited since."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import structlog

from worker.db.sql_files import Migration, query, split_statements

log = structlog.get_logger(__name__)


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


@dataclass(frozen=True)
class MigrationTimeouts:
    """Postgres's `lock_timeout` and `statement_timeout` for every statement of a migration
    (MIGRATION_LOCK_TIMEOUT_SECONDS, MIGRATION_STATEMENT_TIMEOUT_SECONDS): a migration
    queued behind a long transaction for a table lock would queue every later query on that
    table behind itself, so it gives up instead; see docs/migrations.md."""

    lock_timeout_seconds: float = 5.0
    statement_timeout_seconds: float = 1800.0

    @property
    def client_timeout_seconds(self) -> float:
        """asyncpg's own timeout per statement: later than Postgres's, so that Postgres
        cancels first and says why."""
        return self.statement_timeout_seconds + self.lock_timeout_seconds + 30


class MigrationTimedOutError(RuntimeError):
    def __init__(
        self, migration: Migration, timeouts: MigrationTimeouts, error: asyncpg.PostgresError
    ) -> None:
        if isinstance(error, asyncpg.LockNotAvailableError):
            what = (
                f"waited more than {timeouts.lock_timeout_seconds:g} s for a lock "
                "(MIGRATION_LOCK_TIMEOUT_SECONDS): a transaction holds the table it changes"
            )
        else:
            what = (
                f"ran longer than {timeouts.statement_timeout_seconds:g} s "
                "(MIGRATION_STATEMENT_TIMEOUT_SECONDS)"
            )
        if migration.transactional:
            outcome = "nothing of it was applied; run migrate again"
        else:
            outcome = (
                "it runs outside a transaction, so its statements before the failing one "
                "stay applied; it is written to be run again: run migrate again"
            )
        super().__init__(f"migration {migration.version:04d}_{migration.name} {what}; {outcome}")


async def apply_migrations(
    connection: asyncpg.Connection,
    migrations: Sequence[Migration],
    timeouts: MigrationTimeouts | None = None,
) -> list[Migration]:
    """Applies the migrations not yet recorded, each in its own transaction (or, marked
    `-- migrate: no-transaction`, statement by statement), under an advisory lock so
    concurrent `migrate` runs apply every file once, and with the lock and statement
    timeouts set once that lock is held (waiting for another `migrate` is fine)."""
    timeouts = timeouts or MigrationTimeouts()
    await connection.execute(query("lock_migrations"))
    try:
        await connection.execute(
            query("set_migration_timeouts"),
            _milliseconds(timeouts.lock_timeout_seconds),
            _milliseconds(timeouts.statement_timeout_seconds),
        )
        await connection.execute(query("create_migrations_table"))
        await connection.execute(query("keep_migrations_table_private"))
        return await _apply_missing(connection, migrations, timeouts)
    except asyncpg.InsufficientPrivilegeError as error:
        role = connection.get_settings().session_authorization
        raise MigrationNotPermittedError(role, error) from error
    finally:
        await connection.execute(query("reset_migration_timeouts"))
        await connection.execute(query("unlock_migrations"))


def _milliseconds(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


async def _apply_missing(
    connection: asyncpg.Connection, migrations: Sequence[Migration], timeouts: MigrationTimeouts
) -> list[Migration]:
    applied = {row["version"]: row for row in await connection.fetch(query("applied_migrations"))}
    newly_applied = []
    for migration in migrations:
        recorded = applied.get(migration.version)
        if recorded is not None:
            if recorded["checksum"] != migration.checksum:
                raise MigrationChangedError(migration)
            continue
        try:
            await _apply_one(connection, migration, timeouts.client_timeout_seconds)
        except (asyncpg.LockNotAvailableError, asyncpg.QueryCanceledError) as error:
            raise MigrationTimedOutError(migration, timeouts, error) from error
        log.info(
            "migration.applied",
            migration=migration.version,
            name=migration.name,
            transactional=migration.transactional,
        )
        newly_applied.append(migration)
    return newly_applied


async def _apply_one(
    connection: asyncpg.Connection, migration: Migration, client_timeout_seconds: float
) -> None:
    # asyncpg's timeout, not asyncio's: the pool's command_timeout (60 s) would otherwise
    # cut a migration that Postgres lets run (a table rewrite at 10 million rows).
    timeout = client_timeout_seconds
    if migration.transactional:
        async with connection.transaction():
            await connection.execute(migration.sql, timeout=timeout)
            await _record(connection, migration)
        return
    # Each statement commits on its own; the record comes last, so a migration that failed
    # part way is not recorded and runs again from its first statement.
    for statement in split_statements(migration.sql):
        await connection.execute(statement, timeout=timeout)
    await _record(connection, migration)


async def _record(connection: asyncpg.Connection, migration: Migration) -> None:
    await connection.execute(
        query("record_migration"), migration.version, migration.name, migration.checksum
    )


_CREATE_TABLE = re.compile(r"\bCREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)", re.IGNORECASE)
_DROP_TABLE = re.compile(r"\bDROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?(\w+)", re.IGNORECASE)


def tables_created(migrations: Sequence[Migration]) -> list[str]:
    """The tables the migrations leave behind (created and not dropped by a later one), in
    the order they were created: a database lacking one is not migrated for this release."""
    tables: dict[str, None] = {}
    for migration in migrations:
        for statement in migration.sql.split(";"):
            for created in _CREATE_TABLE.findall(statement):
                tables[created.lower()] = None
            for dropped in _DROP_TABLE.findall(statement):
                tables.pop(dropped.lower(), None)
    return list(tables)

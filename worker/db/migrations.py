"""The migration runner: applies the files of sql/migrations/ not applied yet, each once,
and refuses to go on when an applied one was edited since."""

from __future__ import annotations

import re
from collections.abc import Sequence

import asyncpg
import structlog

from worker.db.sql_files import Migration, query

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


async def apply_migrations(
    connection: asyncpg.Connection, migrations: Sequence[Migration]
) -> list[Migration]:
    """Applies the migrations not yet recorded, each in its own transaction, under an
    advisory lock so concurrent `migrate` runs apply every file once."""
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
        log.info("migration.applied", migration=migration.version, name=migration.name)
        newly_applied.append(migration)
    return newly_applied


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

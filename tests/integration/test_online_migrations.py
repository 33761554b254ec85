"""Migrations on a live database (real Postgres): each runs with a lock and a statement
timeout, so one that waits behind a long transaction fails with one line and can be run
again; a migration marked `-- migrate: no-transaction` runs outside a transaction, for
`CREATE INDEX CONCURRENTLY`, and is recorded like any other."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

from tests.support import Services, fetch, fetchval, run_cli
from worker.db.migrations import MigrationTimedOutError, MigrationTimeouts
from worker.db.repository import Repository
from worker.db.sql_files import Migration, load_migrations

pytestmark = pytest.mark.integration

QUICK = MigrationTimeouts(lock_timeout_seconds=0.5, statement_timeout_seconds=1.0)


@asynccontextmanager
async def holding_a_lock_on(url: str, table: str) -> AsyncIterator[None]:
    """A transaction that read `table` and stays open: its ACCESS SHARE lock conflicts with
    the ACCESS EXCLUSIVE lock of an ALTER TABLE."""
    connection = await asyncpg.connect(url)
    try:
        transaction = connection.transaction()
        await transaction.start()
        await connection.fetch(f"SELECT FROM {table} LIMIT 1")
        yield
        await transaction.rollback()
    finally:
        await connection.close()


async def apply(url: str, migrations: list[Migration], timeouts: MigrationTimeouts) -> list[int]:
    owner = await Repository.connect(url, 1)
    try:
        applied = await owner.apply_migrations(migrations, timeouts=timeouts)
    finally:
        await owner.close()
    return [migration.version for migration in applied]


def later(name: str, sql: str) -> Migration:
    return Migration(len(load_migrations()) + 1, name, sql)


async def recorded_versions(url: str) -> list[int]:
    rows = await fetch(url, "SELECT version FROM schema_migrations ORDER BY version")
    return [row["version"] for row in rows]


async def test_a_migration_waiting_on_a_lock_fails_in_one_line_and_runs_again_later(
    services: Services, database_url: str
) -> None:
    owner = services.owner_url(database_url)
    migration = later("add_a_column", "ALTER TABLE devices ADD COLUMN later_note text;")
    async with holding_a_lock_on(owner, "devices"):
        with pytest.raises(MigrationTimedOutError) as refused:
            await apply(owner, [*load_migrations(), migration], QUICK)
    message = str(refused.value)
    assert "\n" not in message
    assert f"migration {migration.version:04d}_add_a_column" in message
    assert "lock" in message
    assert "0.5 s" in message
    assert "nothing of it was applied" in message
    assert migration.version not in await recorded_versions(owner)

    assert await apply(owner, [*load_migrations(), migration], QUICK) == [migration.version]
    assert await fetchval(owner, "SELECT count(*) FROM devices WHERE later_note IS NULL") == 0


async def test_a_migration_running_past_the_statement_timeout_fails_in_one_line(
    services: Services, database_url: str
) -> None:
    owner = services.owner_url(database_url)
    migration = later("slow", "SELECT pg_sleep(5);")
    with pytest.raises(MigrationTimedOutError) as refused:
        await apply(owner, [*load_migrations(), migration], QUICK)
    assert "\n" not in str(refused.value)
    assert "ran longer than 1 s" in str(refused.value)
    assert migration.version not in await recorded_versions(owner)


NO_TRANSACTION = """-- migrate: no-transaction
-- squawk-disable-assume-in-transaction
-- Built without blocking writes to devices; a build that failed leaves an INVALID index,
-- which the DROP removes when the migration runs again.
DROP INDEX CONCURRENTLY IF EXISTS devices_by_hostname;
CREATE INDEX CONCURRENTLY IF NOT EXISTS devices_by_hostname ON devices (customer_id, hostname);
"""


async def test_a_no_transaction_migration_builds_an_index_concurrently(
    services: Services, database_url: str
) -> None:
    owner = services.owner_url(database_url)
    migration = later("index_concurrently", NO_TRANSACTION)
    assert not migration.transactional
    assert await apply(owner, [*load_migrations(), migration], QUICK) == [migration.version]
    valid = await fetchval(
        owner,
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'devices_by_hostname'::regclass",
    )
    assert valid is True
    rows = await fetch(
        owner, "SELECT name, checksum FROM schema_migrations WHERE version = $1", migration.version
    )
    assert [(row["name"], row["checksum"]) for row in rows] == [
        ("index_concurrently", migration.checksum)
    ]
    assert await apply(owner, [*load_migrations(), migration], QUICK) == [], "applied once"


async def test_a_no_transaction_migration_that_fails_is_not_recorded_and_runs_again(
    services: Services, database_url: str
) -> None:
    owner = services.owner_url(database_url)
    migration = later("index_concurrently", NO_TRANSACTION)
    async with holding_a_lock_on(owner, "devices"):
        # CONCURRENTLY waits for the transactions that use the table: the lock timeout ends it.
        with pytest.raises(MigrationTimedOutError) as refused:
            await apply(owner, [*load_migrations(), migration], QUICK)
    assert "outside a transaction" in str(refused.value)
    assert migration.version not in await recorded_versions(owner)
    assert await apply(owner, [*load_migrations(), migration], QUICK) == [migration.version]
    valid = await fetchval(
        owner,
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'devices_by_hostname'::regclass",
    )
    assert valid is True


async def test_migrate_command_gives_up_on_a_lock_with_one_line(services: Services) -> None:
    url = await services.create_database("license_online")
    await apply(url, [m for m in load_migrations() if m.version <= 10], QUICK)
    environment = {
        **{name: value for name, value in os.environ.items() if not name.startswith("PSEUDONYM")},
        "DATABASE_URL": url,
        "MIGRATION_LOCK_TIMEOUT_SECONDS": "0.5",
    }
    async with holding_a_lock_on(url, "license_outbox"):  # 0011 alters license_outbox
        refused = run_cli(environment, "migrate")
    assert refused.returncode == 1, refused.stderr
    [line] = [line for line in refused.stderr.splitlines() if line.strip()]
    assert "migration 0011_allocation_settle_window waited more than 0.5 s for a lock" in line
    assert "Traceback" not in refused.stderr
    migrated = run_cli(environment, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert await recorded_versions(url) == [m.version for m in load_migrations()]

"""The database connection of a one-shot command: one attempt, and every way it can fail
told as what the operator must fix (worker/failures.py) instead of a driver's traceback."""

from __future__ import annotations

import asyncpg

from worker.db.errors import DatabaseAccessRefused, database_refusal, is_no_answer
from worker.db.migrations import tables_created
from worker.db.repository import Repository
from worker.db.sql_files import load_migrations
from worker.failures import (
    OperatorError,
    database_address,
    database_not_migrated,
    postgres_unreachable,
)
from worker.settings import Settings


async def connect_once(
    settings: Settings, pool_size: int = 1, *, require_migrated: bool = True
) -> Repository:
    """A Repository, or ServiceUnreachable, DatabaseAccessRefused, OperatorError (no such
    database) or, with `require_migrated`, DatabaseNotMigrated."""
    url = settings.database_url.get_secret_value()
    try:
        repository = await Repository.connect(url, pool_size)
    except Exception as error:
        raise connection_failure(url, error) from None
    if require_migrated:
        try:
            await ensure_migrated(repository, url)
        except BaseException:
            await repository.close()
            raise
    return repository


def connection_failure(url: str, error: Exception) -> Exception:
    """What a failed connection to `url` means for the operator (`error` itself when it
    means nothing known)."""
    refusal = database_refusal(error)
    if refusal is not None:
        return DatabaseAccessRefused(refusal)
    if isinstance(error, asyncpg.InvalidCatalogNameError):
        return OperatorError(
            f"Postgres at {database_address(url)} has no such database (DATABASE_URL): "
            "check the database name, or create it"
        )
    if is_no_answer(error):
        return postgres_unreachable(url, error)
    return error


async def ensure_migrated(repository: Repository, url: str) -> None:
    """Raises DatabaseNotMigrated unless every table of this release's migrations exists."""
    missing = [
        row["name"]
        for row in await repository.fetch("missing_tables", tables_created(load_migrations()))
    ]
    if missing:
        raise database_not_migrated(url, missing)

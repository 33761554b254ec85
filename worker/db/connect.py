"""The database connection of a one-shot command: one attempt, and every way it can fail
told as what the operator must fix (worker/failures.py) instead of a driver's traceback."""

from __future__ import annotations

import re

import asyncpg
import structlog

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
    settings: Settings,
    pool_size: int = 1,
    *,
    require_migrated: bool = True,
    for_reading: bool = False,
) -> Repository:
    """A Repository, or ServiceUnreachable, DatabaseAccessRefused, OperatorError (no such
    database) or, with `require_migrated`, DatabaseNotMigrated. `for_reading` (commands
    that only read: `report usage`, `reconcile`) connects to READ_DATABASE_URL when it is
    set, and logs whether that server is a replica and how far behind it replays."""
    url = (
        settings.report_database_url() if for_reading else settings.database_url.get_secret_value()
    )
    variable = settings.report_database_variable() if for_reading else "DATABASE_URL"
    try:
        repository = await Repository.connect(
            url, pool_size, statement_cache_size=settings.database_statement_cache_size
        )
    except Exception as error:
        raise connection_failure(url, error, variable) from None
    try:
        if require_migrated:
            await ensure_migrated(repository, url, variable)
        if variable == "READ_DATABASE_URL":
            await log_read_database_status(repository, variable)
    except BaseException:
        await repository.close()
        raise
    return repository


def connection_failure(url: str, error: Exception, variable: str = "DATABASE_URL") -> Exception:
    """What a failed connection to `url` (from `variable`) means for the operator (`error`
    itself when it means nothing known)."""
    refusal = database_refusal(error)
    if refusal is not None:
        if variable == "READ_DATABASE_URL":  # names READ_DATABASE_URL, READ_..._PASSWORD_FILE
            refusal = re.sub(r"\bDATABASE_", "READ_DATABASE_", refusal)
        return DatabaseAccessRefused(refusal)
    if isinstance(error, asyncpg.InvalidCatalogNameError):
        return OperatorError(
            f"Postgres at {database_address(url)} has no such database ({variable}): "
            "check the database name, or create it"
        )
    if is_no_answer(error):
        return postgres_unreachable(url, error, variable)
    return error


async def ensure_migrated(repository: Repository, url: str, variable: str = "DATABASE_URL") -> None:
    """Raises DatabaseNotMigrated unless every table of this release's migrations exists."""
    missing = [
        row["name"]
        for row in await repository.fetch("missing_tables", tables_created(load_migrations()))
    ]
    if missing:
        raise database_not_migrated(url, missing, variable)


async def log_read_database_status(repository: Repository, variable: str) -> None:
    """One log line, `database.read_replica`: whether the server reads come from is a replica
    (in recovery) and how stale it may be (docs/operations.md, "Reports off the primary").
    A server that is not in recovery is read all the same, with a warning: its snapshot is
    held on a primary."""
    [row] = await repository.fetch("read_database_status")
    lag = row["replay_lag_seconds"]
    fields = {
        "variable": variable,
        "in_recovery": row["in_recovery"],
        "replay_lag_seconds": None if lag is None else round(float(lag), 3),
        "replay_caught_up": row["replay_caught_up"],
    }
    logger = structlog.get_logger(__name__)
    if row["in_recovery"]:
        logger.info("database.read_replica", **fields)
    else:
        logger.warning("database.read_replica", **fields, reason="not a replica")

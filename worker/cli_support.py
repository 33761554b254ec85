"""The connect/use/close pattern every CLI command shares."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from worker.db.repository import Repository
    from worker.settings import Settings


@asynccontextmanager
async def connected(
    settings: Settings, *, pool_size: int = 1, unreachable_is_error: bool = False
) -> AsyncIterator[Repository]:
    """A Repository on the configured database, closed however the block ends.

    With `unreachable_is_error`, a database that cannot be reached becomes a one-line
    command error instead of a traceback."""
    # Imported here: asyncpg is not loaded for `--help`.
    from worker.db.repository import Repository  # noqa: PLC0415

    try:
        repository = await Repository.connect(settings.database_url.get_secret_value(), pool_size)
    except OSError as error:
        if unreachable_is_error:
            raise click.ClickException(f"cannot reach the database: {error}") from None
        raise
    try:
        yield repository
    finally:
        await repository.close()

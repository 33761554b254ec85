"""The connect/use/close pattern every CLI command shares."""

from __future__ import annotations

from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click
from pydantic import ValidationError

from worker.ops.logs import configure_logging
from worker.settings import Settings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from worker.db.repository import Repository


def load_settings(*, needs_pseudonym_key: bool = False) -> Settings:
    """The settings, or a one-line command error. Commands that decide licenses or purge
    (`run`, `sweep`) need the pseudonym key: they refuse to start without it."""
    try:
        settings = Settings()
    except ValidationError as error:
        problems = "; ".join(describe_problem(detail) for detail in error.errors(include_url=False))
        raise click.ClickException(f"invalid configuration: {problems}") from None
    if needs_pseudonym_key:
        try:
            settings.required_pseudonym_key()
        except ValueError as error:
            raise click.ClickException(f"invalid configuration: {error}") from None
    configure_logging(settings.log_level, settings.log_format)
    return settings


def describe_problem(detail: Any) -> str:
    """One refused setting; checks across variables (the *_FILE ones) name theirs."""
    if not detail["loc"]:
        return str(detail["msg"]).removeprefix("Value error, ")
    return f"{str(detail['loc'][0]).upper()}: {detail['msg']}"


def parse_time(text: str, param_hint: str = "--now") -> datetime:
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not an ISO 8601 time", param_hint=param_hint
        ) from None
    if parsed.tzinfo is None:
        raise click.BadParameter(
            "give a time zone, e.g. 2026-12-30T00:00:00Z", param_hint=param_hint
        )
    return parsed


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

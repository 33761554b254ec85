"""The connect/use/close pattern every CLI command shares."""

from __future__ import annotations

from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click
import structlog
from pydantic import ValidationError

from worker.failures import ExitCode, OperatorError, connection_reason
from worker.ops.logs import configure_logging, crash_fields
from worker.settings import Settings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from worker.db.repository import Repository


def load_settings(*, needs_pseudonym_key: bool = False, long_running: bool = False) -> Settings:
    """The settings, or a one-line command error. Commands that decide licenses or purge
    (`run`, `sweep`) need the pseudonym key: they refuse to start without it. A one-shot
    command (not `long_running`) leaves the libraries' warnings and errors out of its
    output: its own one line says what failed (aiokafka's "Unable connect to ..." would
    only repeat it)."""
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
    configure_logging(
        settings.log_level,
        settings.log_format,
        settings.replica_id,
        library_level="warning" if long_running else "critical",
    )
    return settings


def describe_problem(detail: Any) -> str:
    """One refused setting; checks across variables (the *_FILE ones) name theirs."""
    message = str(detail["msg"]).removeprefix("Value error, ")
    if not detail["loc"]:
        return message
    return f"{str(detail['loc'][0]).upper()}: {message}"


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


def command_failure(error: Exception) -> click.ClickException:
    """A command's failure as one line and its exit status (worker/failures.py, ExitCode).
    Only messages written for the operator are shown; any other error by its class, since
    a driver's message can quote a value (docs/security.md)."""
    # Imported here: asyncpg and aiokafka are not loaded for `--help`.
    import asyncpg  # noqa: PLC0415
    from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError  # noqa: PLC0415

    from worker.db.errors import DatabaseAccessRefused  # noqa: PLC0415
    from worker.kafka.refusals import KafkaAccessRefused  # noqa: PLC0415
    from worker.weak_settings import WeakSettingsRefused  # noqa: PLC0415

    if isinstance(error, OperatorError):
        return _failure(str(error), error.exit_code)
    if isinstance(error, KafkaAccessRefused | DatabaseAccessRefused | WeakSettingsRefused):
        return _failure(str(error), ExitCode.ERROR)
    if isinstance(
        error,
        asyncpg.UndefinedTableError | asyncpg.UndefinedColumnError | asyncpg.UndefinedFunctionError,
    ):
        return _failure(
            f"the database (DATABASE_URL) lacks what this release uses ({type(error).__name__}, "
            f"SQLSTATE {error.sqlstate}): run `license-worker migrate`",
            ExitCode.NOT_MIGRATED,
        )
    if isinstance(error, OSError) and error.filename is not None:
        return _failure(f"cannot use {error.filename}: {error.strerror}", ExitCode.ERROR)
    if isinstance(error, asyncpg.PostgresConnectionError | asyncpg.InterfaceError):
        return _failure(
            f"lost the connection to Postgres (DATABASE_URL): {connection_reason(error)}",
            ExitCode.UNREACHABLE,
        )
    if isinstance(error, OSError):
        return _failure(
            "lost a connection to Postgres or Kafka (DATABASE_URL, KAFKA_BOOTSTRAP_SERVERS): "
            f"{connection_reason(error)}",
            ExitCode.UNREACHABLE,
        )
    if isinstance(error, KafkaConnectionError | KafkaTimeoutError):
        return _failure(
            f"lost the connection to Kafka (KAFKA_BOOTSTRAP_SERVERS): {type(error).__name__}",
            ExitCode.UNREACHABLE,
        )
    structlog.get_logger(__name__).critical("command.crashed", **crash_fields(error))
    return _failure(
        f"unexpected {type(error).__name__} (where: the command.crashed log line); "
        "please report it",
        ExitCode.ERROR,
    )


class _Refused(click.ClickException):
    exit_code = ExitCode.ERROR


class _Unreachable(click.ClickException):
    exit_code = ExitCode.UNREACHABLE


class _NotMigrated(click.ClickException):
    exit_code = ExitCode.NOT_MIGRATED


class DifferencesFound(click.ClickException):
    """A check that ran and found differences (`reconcile`, `license-events verify`)."""

    exit_code = ExitCode.DIFFERENCES


_FAILURES: dict[int, type[click.ClickException]] = {
    failure.exit_code: failure for failure in (_Refused, _Unreachable, _NotMigrated)
}


def _failure(message: str, exit_code: int) -> click.ClickException:
    return _FAILURES.get(exit_code, _Refused)(message)


@asynccontextmanager
async def connected(
    settings: Settings,
    *,
    pool_size: int = 1,
    require_migrated: bool = True,
    for_reading: bool = False,
) -> AsyncIterator[Repository]:
    """A Repository on the configured database, closed however the block ends. A database
    that cannot be reached, refuses the login or (with `require_migrated`, every command but
    `migrate` and `create-roles`) is not migrated ends the command with one line
    (worker/db/connect.py). `for_reading`: on READ_DATABASE_URL when it is set (`report
    usage` and `reconcile` only: they write nothing)."""
    # Imported here: asyncpg is not loaded for `--help`.
    from worker.db.connect import connect_once  # noqa: PLC0415

    repository = await connect_once(
        settings, pool_size, require_migrated=require_migrated, for_reading=for_reading
    )
    try:
        yield repository
    finally:
        await repository.close()

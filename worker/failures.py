"""Failures an operator fixes outside the program (a service down, a setting wrong, a
database not migrated): each is told as one line naming the cause and the setting to
check, and ends a command with its own exit status (README, "Exit status")."""

from __future__ import annotations

import os
import socket
from enum import IntEnum
from urllib.parse import urlsplit


class ExitCode(IntEnum):
    """Every command's exit statuses. `erase`, `hold` and `release-hold` add 4, 5 and 6 for
    their refusals (worker/licensing/erasures.py); `check` exits 1 for any failure, as a
    container probe must (Docker reserves 2)."""

    OK = 0
    # Refused: invalid configuration, credentials or a certificate refused, a port in
    # use, a weak setting under STRICT_SECURITY, a command's own refusal, an unexpected error.
    ERROR = 1
    USAGE = 2  # a nonsense argument or option (click's usage errors)
    UNREACHABLE = 3  # Postgres or Kafka did not answer: try again once it is back
    NOT_MIGRATED = 7  # the database lacks this release's tables: run `license-worker migrate`
    # A check ran and found what it checks for: `reconcile` (either mode) found differences,
    # `license-events verify` records that do not verify. Its own status, so that a job
    # alerting on differences does not fire for an outage (3) or a bad setting (1).
    DIFFERENCES = 8


class OperatorError(Exception):
    """A failure with a message for the operator; the message never quotes a secret or a
    personal value."""

    exit_code: int = ExitCode.ERROR


class ServiceUnreachable(OperatorError):
    exit_code = ExitCode.UNREACHABLE


class DatabaseNotMigrated(OperatorError):
    exit_code = ExitCode.NOT_MIGRATED


class PortUnavailable(OperatorError):
    """A port the worker must listen on cannot be bound (in use, or not permitted)."""


def connection_reason(error: BaseException) -> str:
    """Why a connection failed, in the system's words ("connection refused"), never the
    driver's message (which may quote the DSN)."""
    if isinstance(error, socket.gaierror):
        return f"cannot resolve the host name ({error.strerror})"
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno).lower()
    return type(error).__name__


def database_address(url: str) -> str:
    """`host:port/database` of a Postgres URL, without its user or password."""
    try:
        parts = urlsplit(url)
        hosts = parts.netloc.rpartition("@")[2] or "the default host"
    except ValueError:
        return "the configured address"
    return f"{hosts}{parts.path}"


def postgres_unreachable(
    url: str, error: BaseException, variable: str = "DATABASE_URL"
) -> ServiceUnreachable:
    return ServiceUnreachable(
        f"cannot reach Postgres at {database_address(url)} ({variable}): {connection_reason(error)}"
    )


def kafka_unreachable(bootstrap_servers: str, error: BaseException | None) -> ServiceUnreachable:
    reason = connection_reason(error) if error is not None else "no broker answered"
    return ServiceUnreachable(
        f"cannot reach Kafka at {bootstrap_servers} (KAFKA_BOOTSTRAP_SERVERS): {reason}"
    )


def database_not_migrated(
    url: str, missing_tables: list[str], variable: str = "DATABASE_URL"
) -> DatabaseNotMigrated:
    shown = ", ".join(missing_tables[:3]) + (", ..." if len(missing_tables) > 3 else "")
    return DatabaseNotMigrated(
        f"the database at {database_address(url)} ({variable}) is not migrated for this "
        f"release: {len(missing_tables)} tables missing ({shown}); run `license-worker migrate`"
    )

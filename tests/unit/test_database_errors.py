"""`worker.repository.is_transient_database_error`: wait and retry, or reject the data."""

from __future__ import annotations

import ssl

import asyncpg
import pytest

from worker.repository import is_transient_database_error


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "refused"),
        TimeoutError(),
        ssl.SSLCertVerificationError("certificate verify failed"),
        asyncpg.AdminShutdownError("terminating connection"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.SerializationError("could not serialize access"),
        asyncpg.DeadlockDetectedError("deadlock detected"),
        asyncpg.TooManyConnectionsError("too many clients"),
        # The role, not the data: a rotated password or a missing grant is fixed by an
        # operator, and the same batch then goes through.
        asyncpg.InvalidPasswordError("password authentication failed"),
        asyncpg.InvalidAuthorizationSpecificationError("no pg_hba.conf entry"),
        asyncpg.InsufficientPrivilegeError("permission denied for table devices"),
    ],
    ids=type,
)
def test_outages_and_role_problems_are_waited_out(error: BaseException) -> None:
    assert is_transient_database_error(error)


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.InvalidParameterValueError("poison device"),
        asyncpg.UniqueViolationError("duplicate key"),
        asyncpg.CheckViolationError("violates check constraint"),
        asyncpg.StringDataRightTruncationError("value too long"),
        asyncpg.CharacterNotInRepertoireError("invalid byte sequence"),
        ValueError("not a database error"),
    ],
    ids=type,
)
def test_data_errors_are_not_retried(error: BaseException) -> None:
    assert not is_transient_database_error(error)

"""`worker.db.errors.is_transient_database_error`: wait and retry, or reject the data."""

from __future__ import annotations

import asyncio
import ssl

import asyncpg
import pytest

from tests.support import free_port
from worker.db.errors import is_no_answer, is_transient_database_error
from worker.db.wait import PROBE_TIMEOUT_SECONDS, database_answers


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "refused"),
        ConnectionResetError(104, "reset by peer"),
        TimeoutError(),
        # The pool's and the driver's words for a connection the server closed.
        asyncpg.InterfaceError("connection is closed"),
        asyncpg.InterfaceError("pool is closing"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.InternalClientError("cannot switch to state 15; another operation is in progress"),
        ssl.SSLCertVerificationError("certificate verify failed"),
        asyncpg.AdminShutdownError("terminating connection"),
        asyncpg.CannotConnectNowError("the database system is starting up"),  # 57P03
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


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "refused"),
        ConnectionResetError(104, "reset by peer"),
        TimeoutError(),
        asyncpg.InterfaceError("connection is closed"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        ssl.SSLEOFError("EOF occurred in violation of protocol"),
    ],
    ids=type,
)
def test_a_server_away_gives_no_answer(error: BaseException) -> None:
    assert is_no_answer(error)


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.InvalidPasswordError("password authentication failed"),
        asyncpg.TooManyConnectionsError("too many clients"),
        asyncpg.InsufficientPrivilegeError("permission denied"),
        ssl.SSLCertVerificationError("certificate verify failed"),
        asyncpg.SerializationError("could not serialize access"),
    ],
    ids=type,
)
def test_a_refusal_is_an_answer(error: BaseException) -> None:
    """The server is up: waiting for it to answer would not help, backing off does."""
    assert not is_no_answer(error)


async def test_the_probe_of_a_port_nobody_listens_on_gets_no_answer() -> None:
    started = asyncio.get_running_loop().time()
    assert not await database_answers(f"postgresql://nobody@127.0.0.1:{free_port()}/none")
    assert asyncio.get_running_loop().time() - started < 2


async def test_the_probe_of_a_server_that_never_answers_gives_up_within_its_timeout() -> None:
    connections: list[asyncio.StreamWriter] = []

    async def accept_and_say_nothing(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)

    server = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        started = asyncio.get_running_loop().time()
        assert not await database_answers(f"postgresql://nobody@127.0.0.1:{port}/none")
        elapsed = asyncio.get_running_loop().time() - started
        assert PROBE_TIMEOUT_SECONDS <= elapsed < PROBE_TIMEOUT_SECONDS + 1
    finally:
        for writer in connections:
            writer.close()
            await writer.wait_closed()
        server.close()
        await server.wait_closed()

"""What a database error means for the caller: wait and retry the same statement, or reject
the data (`is_transient_database_error`); the server is not there at all (`is_no_answer`); or
an operator must fix the configuration before the worker can start (`database_refusal`)."""

from __future__ import annotations

import asyncio
import ssl

import asyncpg

# Errors after which the same statement can succeed later: the server went away, is
# starting or shutting down, or the transaction lost a race; or the server refused the role
# itself (class 28: a wrong or rotated password; 42501: a missing grant), which an operator
# fixes without the data changing, so it must never send messages to the DLQ. Anything else
# is a property of the data and retrying it would block the partition forever.
_TRANSIENT_SQLSTATE_CLASSES = ("08", "28", "53", "57", "58")
_TRANSIENT_SQLSTATES = {"40001", "40P01", "55P03", "42501"}

# SQLSTATE classes of a server that is not there for us: connection exceptions (08) and
# operator intervention (57: shutting down, 57P01; starting up, 57P03).
_NO_ANSWER_SQLSTATE_CLASSES = ("08", "57")


class DatabaseAccessRefused(Exception):
    """Postgres answered at start-up, but will not let us in with this configuration."""


class ConcurrentDecisionError(Exception):
    """Another transaction changed a license between this one's read and its write: the
    decision was made on stale facts. Transient: the batch is decided again."""


def database_refusal(error: BaseException) -> str | None:
    """What an operator must fix when connecting at start-up failed with `error`: rejected
    credentials or an untrusted server certificate. None when waiting may help. (Once
    running, the same errors are waited out: a password rotated mid-flight, say.)"""
    if isinstance(error, ssl.SSLCertVerificationError):
        return (
            "Postgres's TLS certificate is not trusted "
            f"({error.verify_message}): check sslrootcert and the host name in DATABASE_URL"
        )
    sqlstate = getattr(error, "sqlstate", None) or ""
    if isinstance(error, asyncpg.PostgresError) and sqlstate.startswith("28"):
        return (
            f"Postgres rejected the login (SQLSTATE {sqlstate}): check the user in "
            "DATABASE_URL and its password (DATABASE_URL or DATABASE_PASSWORD_FILE)"
        )
    return None


def is_transient_database_error(error: BaseException) -> bool:
    """Whether the same statement can succeed later (see the SQLSTATEs above). Every way of
    losing the server is: connection refused or reset (OSError), a timeout, the pool's or
    the driver's "connection is closed" (InterfaceError, 08003), starting up or shutting down
    (57P03, 57P01), and the driver losing track of a connection the server dropped
    mid-statement ("cannot switch to state ...; another operation is in progress":
    InternalClientError), which never depends on the data. So is a license decision raced by
    another one (ConcurrentDecisionError): it is made again from the new state."""
    if isinstance(
        error,
        OSError
        | asyncio.TimeoutError
        | asyncpg.InterfaceError
        | asyncpg.InternalClientError
        | ConcurrentDecisionError,
    ):
        return True
    if isinstance(error, asyncpg.PostgresError):
        sqlstate = getattr(error, "sqlstate", None) or ""
        return sqlstate in _TRANSIENT_SQLSTATES or sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES
    return False


def is_no_answer(error: BaseException) -> bool:
    """Whether `error` says the server is not there (down, starting, shutting down, the
    connection lost), rather than that it answered and refused (credentials, certificate,
    too many connections, a statement)."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return False
    if isinstance(error, OSError | TimeoutError | asyncpg.InterfaceError):
        return True
    sqlstate = getattr(error, "sqlstate", None) or ""
    return isinstance(error, asyncpg.PostgresError) and sqlstate[:2] in _NO_ANSWER_SQLSTATE_CLASSES

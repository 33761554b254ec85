"""The service's three Postgres roles (sql/roles/create_roles.sql): their names, the verifiers
of their passwords, and the setup a superuser runs to create and grant them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

import asyncpg

from worker.db.sql_files import role_setup_queries

# Lower-case identifiers need no quoting in SQL, URLs or docs; 63 bytes is Postgres' limit.
_ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
SCRAM_ITERATIONS = 4096  # Postgres' default (scram_iterations)


@dataclass(frozen=True)
class DatabaseRoles:
    """`owner` owns the tables and migrates; `worker` runs only the statements of
    sql/queries/; `reporter` only reads what `report usage` reads."""

    owner: str = "license_owner"
    worker: str = "license_worker"
    reporter: str = "license_reporter"

    def __post_init__(self) -> None:
        names = (self.owner, self.worker, self.reporter)
        for role in names:
            if not _ROLE_NAME.match(role):
                raise ValueError(f"{role!r} is not a role name: use a-z, 0-9 and _ (63 at most)")
        if len(set(names)) < len(names):
            raise ValueError(f"the owner, worker and reporter must be three roles: {names}")


class RoleSetupRefusedError(RuntimeError):
    """Postgres refused to create or grant the roles: not a superuser, or a role in the way."""


async def set_up_roles(
    connection: asyncpg.Connection, roles: DatabaseRoles, *verifiers: str
) -> None:
    """Runs sql/roles/create_roles.sql in one transaction: creates the three roles if
    missing, sets the passwords whose verifiers are given (owner, worker, reporter; "" or
    none leaves one unchanged), and grants each role what it needs in this database, and
    nothing more."""
    blocks = role_setup_queries()
    owner_verifier, worker_verifier, reporter_verifier = (*verifiers, "", "", "")[:3]
    async with connection.transaction():
        try:
            await connection.execute(
                blocks["choose_roles"],
                roles.owner,
                roles.worker,
                roles.reporter,
                owner_verifier,
                worker_verifier,
                reporter_verifier,
            )
            for name in (
                "create_roles",
                "grant_database_access",
                "grant_schema_access",
                "grant_table_access",
            ):
                await connection.execute(blocks[name])
        except asyncpg.PostgresError as error:
            raise RoleSetupRefusedError(str(error)) from error


def scram_sha256_verifier(
    password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS
) -> str:
    """What Postgres stores for a SCRAM-SHA-256 password (RFC 5802/7677), computed here as
    psql's `\\password` does: the server, and so its statement log, never sees the password.

    Postgres first normalises a password with SASLprep, which leaves ASCII unchanged; other
    characters are refused here rather than normalised differently from the server."""
    if not password:
        raise ValueError("the password is empty")
    if not password.isascii():
        raise ValueError("use an ASCII password (a generated one is)")
    salt = secrets.token_bytes(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    return f"SCRAM-SHA-256${iterations}:{_b64(salt)}${_b64(stored_key)}:{_b64(server_key)}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")

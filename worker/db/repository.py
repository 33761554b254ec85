"""The pool: transactions, read-only snapshots, leader leases and one-off statements, each on
a connection of its own."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg

from worker.db.leases import Lease, LeaseLost
from worker.db.migrations import MigrationTimeouts, apply_migrations
from worker.db.roles import DatabaseRoles, set_up_roles
from worker.db.session import Session
from worker.db.sql_files import Migration, query
from worker.db.wait import DatabaseAnswers, database_answers


class Repository:
    def __init__(self, pool: asyncpg.Pool, database_url: str) -> None:
        self._pool = pool
        # What the loops that use this pool wait on after a transient error.
        self.answers = DatabaseAnswers(lambda: database_answers(database_url))
        # The lease every transaction of this view checks first (`fenced`).
        self._fence: Lease | None = None

    @classmethod
    async def connect(
        cls, database_url: str, pool_size: int, *, statement_cache_size: int = 64
    ) -> Repository:
        """`statement_cache_size` (DATABASE_STATEMENT_CACHE_SIZE): statements kept prepared
        per connection; 0 for PgBouncer in transaction mode before 1.21 (docs/scaling.md)."""
        pool = await asyncpg.create_pool(
            database_url,
            min_size=1,
            max_size=pool_size,
            command_timeout=60,
            # Statements are few and fixed; keep them prepared per connection.
            statement_cache_size=statement_cache_size,
            server_settings=_server_settings(statement_cache_size),
        )
        return cls(pool, database_url)

    async def close(self) -> None:
        await self._pool.close()

    async def ping(self) -> None:
        async with self._pool.acquire() as connection:
            await connection.fetchval("SELECT 1")

    @contextlib.asynccontextmanager
    async def transaction(self, *, rollback: bool = False) -> AsyncIterator[Session]:
        """A session whose writes commit together when the block ends, or not at all.
        `rollback=True` undoes them at the end (dry runs)."""
        async with self._pool.acquire() as connection:
            transaction = connection.transaction()
            await transaction.start()
            try:
                await self._check_fence(connection)
                yield Session(connection)
            except BaseException:
                await transaction.rollback()
                raise
            if rollback:
                await transaction.rollback()
            else:
                await transaction.commit()

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[Session]:
        """A read-only session on one snapshot of the database (repeatable read): every
        query in the block sees the same data, however long the block takes (a report's
        totals and its detail rows agree while the worker goes on writing)."""
        async with (
            self._pool.acquire() as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            yield Session(connection)

    def fenced(self, lease: Lease) -> Repository:
        """This pool, for a leader's work: every transaction, and every `execute`, first
        checks that `lease` is still this replica's (FOR SHARE, held to the commit) and
        raises LeaseLost otherwise. Reads outside a transaction (`fetch`) are not checked:
        they do nothing."""
        view = copy.copy(self)
        view._fence = lease
        return view

    async def _check_fence(self, connection: asyncpg.Connection) -> None:
        lease = self._fence
        if lease is None:
            return
        if not lease.held:
            raise LeaseLost(lease.name)
        token = await connection.fetchval(
            query("lease_held"), lease.name, lease.holder, lease.token
        )
        if token is None:
            lease.give_up("expired or taken by another replica")
            raise LeaseLost(lease.name)

    async def take_lease(self, lease: Lease) -> bool:
        """Takes `lease` if it expired (or renews it if already its holder's)."""
        asked_at = asyncio.get_running_loop().time()
        async with self._pool.acquire() as connection:
            token = await connection.fetchval(
                query("take_lease"), lease.name, lease.holder, lease.duration
            )
        if token is None:
            return False
        lease.renewed(token, asked_at)
        return True

    async def renew_lease(self, lease: Lease) -> bool:
        """Extends `lease` from now; False once it is no longer its holder's."""
        asked_at = asyncio.get_running_loop().time()
        async with self._pool.acquire() as connection:
            token = await connection.fetchval(
                query("renew_lease"), lease.name, lease.holder, lease.token, lease.duration
            )
        if token is None:
            return False
        lease.renewed(token, asked_at)
        return True

    async def release_lease(self, lease: Lease) -> None:
        async with self._pool.acquire() as connection:
            await connection.execute(query("release_lease"), lease.name, lease.holder, lease.token)

    async def fetch(self, name: str, *arguments: Any) -> list[asyncpg.Record]:
        """Runs a named read-only query outside any explicit transaction."""
        async with self._pool.acquire() as connection:
            return list(await connection.fetch(query(name), *arguments))

    async def execute(self, name: str, *arguments: Any) -> str:
        if self._fence is not None:
            async with self.transaction() as session:
                return await session.execute(name, *arguments)
        async with self._pool.acquire() as connection:
            return str(await connection.execute(query(name), *arguments))

    async def summary(self) -> dict[str, Any]:
        async with self._pool.acquire() as connection:
            row = await connection.fetchrow(query("summary"))
        return dict(row)

    async def apply_migrations(
        self,
        migrations: Sequence[Migration],
        pseudonym_key_sha256: str = "",
        timeouts: MigrationTimeouts | None = None,
    ) -> list[Migration]:
        """Applies the migrations not yet recorded (worker.db.migrations). The SHA-256 of
        the configured pseudonym key lets migration 0009 check it was exported."""
        async with self._pool.acquire() as connection:
            await connection.execute(query("tell_migrations_the_key_hash"), pseudonym_key_sha256)
            try:
                return await apply_migrations(connection, migrations, timeouts)
            finally:
                await connection.execute(query("tell_migrations_the_key_hash"), "")

    async def set_up_roles(self, roles: DatabaseRoles, *verifiers: str) -> None:
        """Creates and grants the service's roles (worker.db.roles.set_up_roles)."""
        async with self._pool.acquire() as connection:
            await set_up_roles(connection, roles, *verifiers)


def _server_settings(statement_cache_size: int) -> dict[str, str]:
    """With prepared statements kept, Postgres would switch one to a generic plan after five
    executions: a plan made while a table was small (a fresh database, a new customer's
    fleet) keeps sequential scans long after the table grew, until autovacuum happens to
    analyze it. So plan them on every execution; planning costs far less than a batch
    statement. Without the cache (PgBouncer before 1.21) every statement is parsed again at
    each execution and so always planned with its parameters: the start-up parameter, which
    PgBouncer refuses, is not sent (docs/scaling.md, "PgBouncer")."""
    if statement_cache_size == 0:
        return {}
    return {"plan_cache_mode": "force_custom_plan"}

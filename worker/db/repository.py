"""The pool: transactions, read-only snapshots, cluster-wide locks and one-off statements,
each on a connection of its own."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg

from worker.db.migrations import MigrationTimeouts, apply_migrations
from worker.db.roles import DatabaseRoles, set_up_roles
from worker.db.session import Session
from worker.db.sql_files import Migration, query
from worker.db.wait import DatabaseAnswers, database_answers

_CONNECTION_ERRORS = (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError)


class ClusterLock:
    def __init__(self, connection: asyncpg.Connection, name: str) -> None:
        self._connection = connection
        self._name = name
        self.acquired = False

    async def try_acquire(self) -> bool:
        self.acquired = bool(await self._connection.fetchval(query(f"try_lock_{self._name}")))
        return self.acquired

    async def still_held(self) -> bool:
        if not self.acquired:
            return False
        try:
            await self._connection.fetchval("SELECT 1")
        except _CONNECTION_ERRORS:
            self.acquired = False
        return self.acquired

    async def release(self) -> None:
        if self.acquired and not self._connection.is_closed():
            with contextlib.suppress(*_CONNECTION_ERRORS):
                await self._connection.fetchval(query(f"unlock_{self._name}"))
        self.acquired = False


class Repository:
    def __init__(self, pool: asyncpg.Pool, database_url: str) -> None:
        self._pool = pool
        # What the loops that use this pool wait on after a transient error.
        self.answers = DatabaseAnswers(lambda: database_answers(database_url))

    @classmethod
    async def connect(cls, database_url: str, pool_size: int) -> Repository:
        pool = await asyncpg.create_pool(
            database_url,
            min_size=1,
            max_size=pool_size,
            command_timeout=60,
            # Statements are few and fixed; keep them prepared per connection.
            statement_cache_size=64,
            # ...but plan them on every execution: a generic plan made while a table was small
            # (a fresh database, a new customer's fleet) keeps sequential scans long after
            # the table grew, until autovacuum happens to analyze it. Planning costs far less
            # than a batch statement.
            server_settings={"plan_cache_mode": "force_custom_plan"},
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

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[ClusterLock]:
        """Tries the named cluster-wide lock (`sweeper`, `relay`) for the block. The lock
        lives on its own connection and dies with it, so a crashed holder never blocks the
        others; `ClusterLock.still_held()` tells whether that connection is still alive."""
        async with self._pool.acquire() as connection:
            lock = ClusterLock(connection, name)
            await lock.try_acquire()
            try:
                yield lock
            finally:
                await lock.release()

    async def fetch(self, name: str, *arguments: Any) -> list[asyncpg.Record]:
        """Runs a named read-only query outside any explicit transaction."""
        async with self._pool.acquire() as connection:
            return list(await connection.fetch(query(name), *arguments))

    async def execute(self, name: str, *arguments: Any) -> str:
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

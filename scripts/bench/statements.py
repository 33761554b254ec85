"""What Postgres executed for one drain: `pg_stat_statements` of the scenario's database over
the measured window (calls, rows and execution time per statement), when the server loads
the extension (`shared_preload_libraries = 'pg_stat_statements'`; the local services do not
by default: docs/benchmarks.md, "Statements of a drain"). Best effort: None without it."""

from __future__ import annotations

import contextlib
import re
from typing import Any

import asyncpg

from scripts.bench.code_under_test import CODE_DIR
from scripts.bench.scenario import Scenario, Services

TOP_STATEMENTS = 25
_NAME_LINE = re.compile(r"^-- name: ([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
_PREFIX = 100  # characters of a statement (whitespace folded) that identify its query


def _folded(text: str) -> str:
    return " ".join(text.split())[:_PREFIX]


def query_names() -> dict[str, str]:
    """The named queries of the code under test, by the start of their text (what
    `pg_stat_statements` shows of them: comments included, constants replaced later on)."""
    names = {}
    for path in sorted((CODE_DIR / "sql" / "queries").glob("*.sql")):
        text = path.read_text(encoding="utf-8")
        found = list(_NAME_LINE.finditer(text))
        for index, match in enumerate(found):
            end = found[index + 1].start() if index + 1 < len(found) else len(text)
            names[_folded(text[match.end() : end])] = match.group(1)
    return names


def statement_name(statement: str, names: dict[str, str]) -> str:
    """The query's name, or the statement's first 60 characters."""
    folded = _folded(statement)
    for prefix, name in names.items():
        if folded.startswith(prefix) or prefix.startswith(folded):
            return name
    return folded[:60]


class StatementStats:
    """Resets the scenario database's statement statistics when the window starts and reads
    them when it ends. The extension lives in the `postgres` database; its view shows every
    database's statements, filtered here by the scenario's."""

    def __init__(self, services: Services, scenario: Scenario) -> None:
        self._url = services.database_url_for("postgres")
        self._database = scenario.database_name
        self._connection: asyncpg.Connection | None = None
        self._database_oid: int | None = None

    async def __aenter__(self) -> StatementStats:
        with contextlib.suppress(asyncpg.PostgresError, OSError):
            connection = await asyncpg.connect(self._url)
            try:
                loaded = await connection.fetchval(
                    "SELECT 'pg_stat_statements' = ANY(string_to_array("
                    "current_setting('shared_preload_libraries'), ', '))"
                )
                if loaded:
                    await connection.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                    self._database_oid = await connection.fetchval(
                        "SELECT oid FROM pg_database WHERE datname = $1", self._database
                    )
                    self._connection, connection = connection, None
            finally:
                if connection is not None:
                    await connection.close()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def reset(self) -> None:
        if self._connection is not None:
            await self._connection.execute(
                "SELECT pg_stat_statements_reset(0, $1, 0)", self._database_oid
            )

    async def read(self) -> list[dict[str, Any]] | None:
        """The statements since `reset`, most total execution time first (the first lines of
        their text, whitespace folded)."""
        if self._connection is None:
            return None
        rows = await self._connection.fetch(
            "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 400) AS statement, calls, "
            "rows, round(total_exec_time::numeric, 1) AS total_ms "
            "FROM pg_stat_statements WHERE dbid = $1 ORDER BY total_exec_time DESC LIMIT $2",
            self._database_oid,
            TOP_STATEMENTS,
        )
        names = query_names()
        return [
            {
                "statement": statement_name(row["statement"], names),
                "calls": row["calls"],
                "rows": row["rows"],
                "total_ms": float(row["total_ms"]),
            }
            for row in rows
        ]

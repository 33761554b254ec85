"""Migrations against a real, empty database."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tests.support import Services, fetch, migrate_database
from worker.db.sql_files import load_migrations

pytestmark = pytest.mark.integration

EXPECTED_SCHEMA = Path(__file__).with_name("expected_schema.txt")

SCHEMA_QUERY = """
SELECT table_name || '.' || column_name || ' ' || data_type
       || CASE WHEN is_nullable = 'NO' THEN ' not null' ELSE '' END
       || CASE WHEN is_generated = 'ALWAYS' THEN ' generated' ELSE '' END AS line
FROM information_schema.columns
WHERE table_schema = 'public'
UNION ALL
SELECT 'index ' || indexname || ': ' || indexdef FROM pg_indexes WHERE schemaname = 'public'
ORDER BY 1
"""


async def empty_database(services: Services) -> str:
    return await services.create_database("license_migrate")


async def test_migrations_build_the_expected_schema(services: Services) -> None:
    url = await empty_database(services)
    await migrate_database(url)
    actual = "\n".join(row["line"] for row in await fetch(url, SCHEMA_QUERY)) + "\n"
    if os.environ.get("UPDATE_SCHEMA_SNAPSHOT") == "1":
        EXPECTED_SCHEMA.write_text(actual)
    assert actual == EXPECTED_SCHEMA.read_text(), (
        "the schema differs from tests/integration/expected_schema.txt; if the change is "
        "intended, rerun with UPDATE_SCHEMA_SNAPSHOT=1 and review the new snapshot"
    )


async def test_migrate_twice_and_concurrently_applies_each_file_once(services: Services) -> None:
    url = await empty_database(services)
    await asyncio.gather(*(migrate_database(url) for _ in range(3)))
    await migrate_database(url)
    rows = await fetch(url, "SELECT version FROM schema_migrations ORDER BY version")
    assert [row["version"] for row in rows] == [m.version for m in load_migrations()]

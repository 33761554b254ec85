"""Migrations against a real, empty database."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
from pathlib import Path

import pytest

from tests.support import Services, fetch, migrate_database, run_cli
from worker.db.repository import Repository
from worker.db.sql_files import load_migrations

pytestmark = pytest.mark.integration

EXPECTED_SCHEMA = Path(__file__).with_name("expected_schema.txt")

# The monthly partitions (migration 0015) depend on the month the migration ran in: the
# snapshot shows each partitioned table's key and default partition instead of its months.
SCHEMA_QUERY = """
WITH partitions AS (
    SELECT relname FROM pg_class
    WHERE relnamespace = 'public'::regnamespace AND relispartition
)
SELECT table_name || '.' || column_name || ' ' || data_type
       || CASE WHEN is_nullable = 'NO' THEN ' not null' ELSE '' END
       || CASE WHEN is_generated = 'ALWAYS' THEN ' generated' ELSE '' END AS line
FROM information_schema.columns
WHERE table_schema = 'public' AND table_name NOT IN (SELECT relname FROM partitions)
UNION ALL
SELECT 'index ' || indexname || ': ' || indexdef FROM pg_indexes
WHERE schemaname = 'public' AND tablename NOT IN (SELECT relname FROM partitions)
UNION ALL
SELECT 'partitioned ' || c.relname || ': ' || pg_get_partkeydef(c.oid)
       || coalesce(', default ' || (
           SELECT d.relname FROM pg_inherits AS i JOIN pg_class AS d ON d.oid = i.inhrelid
           WHERE i.inhparent = c.oid AND pg_get_expr(d.relpartbound, d.oid) = 'DEFAULT'
       ), '')
FROM pg_class AS c
WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'p'
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


async def migrated_to_0007_with_a_purged_user(services: Services) -> str:
    url = await empty_database(services)
    repository = await Repository.connect(url, 1)
    try:
        await repository.apply_migrations([m for m in load_migrations() if m.version <= 7])
    finally:
        await repository.close()
    await fetch(url, "INSERT INTO customers (customer_id) VALUES ('acme')")
    await fetch(
        url,
        "INSERT INTO users (customer_id, user_id, first_seen_at, last_seen_at, purged_at)"
        " VALUES ('acme', 'purged-0123', now(), now(), now())",
    )
    return url


def migrate_with(url: str, **variables: str) -> subprocess.CompletedProcess[str]:
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith("PSEUDONYM_KEY")
    }
    return run_cli({**environment, "DATABASE_URL": url, **variables}, "migrate")


async def test_0009_refuses_to_drop_a_database_key_that_made_pseudonyms_until_exported(
    services: Services, tmp_path: Path
) -> None:
    url = await migrated_to_0007_with_a_purged_user(services)
    other_key = tmp_path / "other.key"
    other_key.write_text(secrets.token_hex(32))

    for refused in (migrate_with(url), migrate_with(url, PSEUDONYM_KEY_FILE=str(other_key))):
        assert refused.returncode == 1, refused.stderr
        assert "migration refused" in refused.stderr
        assert "export it to a file first" in refused.stderr
        assert await fetch(url, "SELECT FROM service_keys") != []

    # The documented export, as the owner: the database key becomes the key file.
    (stored,) = await fetch(url, "SELECT value FROM service_keys WHERE name = 'pseudonym'")
    exported = tmp_path / "pseudonym.key"
    exported.write_text(stored["value"] + "\n")
    migrated = migrate_with(url, PSEUDONYM_KEY_FILE=str(exported))
    assert migrated.returncode == 0, migrated.stderr
    rows = await fetch(url, "SELECT to_regclass('service_keys') IS NULL AS gone")
    assert rows[0]["gone"]


LEGACY_ID = "429e0b36-7f0d-580a-985b-becd2598b9e9"  # a UUIDv5 of the old scheme
PENDING_ID = "5d1c7a2e-0b9f-5e4d-8c3b-2a1f0e9d8c7b"


async def test_0009_gives_published_user_events_ids_of_no_guessable_scheme(
    services: Services,
) -> None:
    url = await migrated_to_0007_with_a_purged_user(services)
    await fetch(url, "DELETE FROM users")  # no pseudonym made: the key may go
    for event_id, published in ((LEGACY_ID, "now()"), (PENDING_ID, "NULL")):
        await fetch(
            url,
            "INSERT INTO license_history (customer_id, subject_type, subject_id, change,"
            " effective_at, decided_at, event_id) VALUES ('acme', 'user', 'purged-0123',"
            " 'allocated', now(), now(), $1)",
            event_id,
        )
        await fetch(
            url,
            "INSERT INTO license_outbox (event_id, customer_id, subject_type, subject_id,"
            f" payload, published_at) VALUES ($1::uuid, 'acme', 'user', 'purged-0123',"
            f" jsonb_build_object('event_id', $1::text), {published})",
            event_id,
        )
    migrated = migrate_with(url)
    assert migrated.returncode == 0, migrated.stderr
    history = {str(r["event_id"]) for r in await fetch(url, "SELECT event_id FROM license_history")}
    outbox = await fetch(
        url, "SELECT event_id, payload::jsonb ->> 'event_id' AS in_payload FROM license_outbox"
    )
    assert LEGACY_ID not in history
    assert PENDING_ID in history, "not published yet: keeps the id the relay may have sent"
    assert {(str(r["event_id"]), r["in_payload"]) for r in outbox} == {
        (event_id, event_id) for event_id in history
    }


async def test_0009_drops_a_database_key_that_never_made_a_pseudonym(services: Services) -> None:
    url = await migrated_to_0007_with_a_purged_user(services)
    await fetch(url, "UPDATE users SET purged_at = NULL")
    migrated = migrate_with(url)
    assert migrated.returncode == 0, migrated.stderr
    rows = await fetch(url, "SELECT to_regclass('service_keys') IS NULL AS gone")
    assert rows[0]["gone"]


async def test_0012_records_the_devices_stored_before_it_once(services: Services) -> None:
    """Devices stored before the device history get one row each, with their state at the
    upgrade, so an as-of report after it shows their user and kind."""
    url = await empty_database(services)
    repository = await Repository.connect(url, 1)
    try:
        await repository.apply_migrations([m for m in load_migrations() if m.version <= 11])
        await fetch(url, "INSERT INTO customers (customer_id) VALUES ('acme')")
        await fetch(
            url,
            "INSERT INTO devices (customer_id, device_id, user_id, device_kind, first_seen_at,"
            " last_seen_at, last_uninstalled_at, last_present_at) VALUES"
            " ('acme', 'laptop', 'ann', 'personal', now() - interval '2 days',"
            "  now() - interval '1 day', NULL, now() - interval '1 day'),"
            " ('acme', 'gone', NULL, NULL, now() - interval '3 days', now() - interval '3 days',"
            "  now() - interval '2 days', now() - interval '3 days')",
        )
        assert await repository.apply_migrations(load_migrations()) == [
            m for m in load_migrations() if m.version > 11
        ]
    finally:
        await repository.close()
    rows = await fetch(
        url,
        "SELECT h.device_id, h.user_id, h.device_kind, h.protected, h.seen_at = d.last_seen_at"
        " AS seen FROM device_history AS h JOIN devices AS d USING (customer_id, device_id)"
        " ORDER BY h.device_id",
    )
    assert [tuple(row) for row in rows] == [
        ("gone", None, None, False, True),
        ("laptop", "ann", "personal", True, True),
    ]

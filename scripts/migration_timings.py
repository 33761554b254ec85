#!/usr/bin/env python
"""How long each migration takes on a scaled database (docs/migrations.md): the time a
transactional migration holds its locks, since every lock is held until it commits.

    .venv/bin/python scripts/migration_timings.py [--devices 1000000]

Needs DATABASE_URL (a superuser; `bash deploy/local/services.sh start`). In a fresh
database it applies 0001-0003, loads a fleet with set-based SQL (1,000 devices a customer,
one user per device, one active license, one history row and one published outbox row per
user), VACUUM ANALYZEs it, then applies each later migration alone and prints its time,
and the time of one plain index build on devices (what 0001-0003 did, before any data).
Before 0015 (which copies them into monthly partitions) it adds what that migration moves:
one install event per device, a year of daily usage snapshots per customer, and the
history's decision times spread over the last 24 months (untimed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from worker.db.repository import Repository
from worker.db.sql_files import load_migrations

LOADED_BEFORE = 3
SEED = """
INSERT INTO customers (customer_id)
SELECT 'c' || c FROM generate_series(0, ($1::int - 1) / 1000) AS c;
INSERT INTO users (customer_id, user_id, email, first_seen_at, last_seen_at)
SELECT 'c' || (i / 1000), 'u' || i, 'u' || i || '@example.test',
       now() - interval '90 days', now() - (i % 7200) * interval '1 minute'
FROM generate_series(0, $1::int - 1) AS i;
INSERT INTO devices (customer_id, device_id, user_id, device_kind, hostname, os,
                     first_seen_at, last_seen_at, last_present_at)
SELECT 'c' || (i / 1000), 'd' || i, 'u' || i, 'business', 'host-' || i, 'windows',
       now() - interval '90 days', now() - (i % 7200) * interval '1 minute', now()
FROM generate_series(0, $1::int - 1) AS i;
INSERT INTO licenses (customer_id, subject_type, subject_id, active, basis, allocated_at,
                      allocation_reason)
SELECT 'c' || (i / 1000), 'user', 'u' || i, true, 'user', now(), 'first_seen'
FROM generate_series(0, $1::int - 1) AS i;
INSERT INTO license_history (customer_id, subject_type, subject_id, change, basis,
                             effective_at, decided_at, event_id)
SELECT 'c' || (i / 1000), 'user', 'u' || i, 'allocated', 'user', now(), now(),
       gen_random_uuid()
FROM generate_series(0, $1::int - 1) AS i;
INSERT INTO license_outbox (event_id, customer_id, subject_type, subject_id, payload,
                            published_at)
SELECT gen_random_uuid(), 'c' || (i / 1000), 'user', 'u' || i,
       jsonb_build_object('type', 'license.allocated', 'subject_id', 'u' || i), now()
FROM generate_series(0, $1::int - 1) AS i;
"""

# What migration 0015 copies, loaded before it (set-based, untimed).
SEED_BEFORE_0015 = """
INSERT INTO device_lifecycle_events (customer_id, event_id, device_id, event_type, occurred_at)
SELECT 'c' || (i / 1000), 'e' || i, 'd' || i, 'install',
       now() - (i % 730) * interval '1 day'
FROM generate_series(0, $1::int - 1) AS i;
INSERT INTO usage_snapshots (customer_id, day, event_id, taken_at)
SELECT 'c' || c, current_date - d, gen_random_uuid(), now()
FROM generate_series(0, ($1::int - 1) / 1000) AS c, generate_series(0, 364) AS d
WHERE $1::int > 0;
UPDATE license_history SET decided_at = now() - (id % 730) * interval '1 day'
WHERE $1::int > 0
"""
PARTITIONED_IN = 15


async def seed(url: str, devices: int, statements: str = SEED) -> None:
    connection = await asyncpg.connect(url)
    try:
        for statement in filter(str.strip, statements.split(";\n")):
            await connection.execute(statement, devices, timeout=3600)
        await connection.execute("VACUUM ANALYZE", timeout=3600)
    finally:
        await connection.close()


async def index_build(url: str) -> float:
    """A plain CREATE INDEX on devices as 0001-0003 built them, for their row of the table."""
    connection = await asyncpg.connect(url)
    try:
        transaction = connection.transaction()
        await transaction.start()
        started = time.perf_counter()
        await connection.execute(
            "CREATE INDEX timing_probe ON devices (customer_id, last_seen_at) WHERE protected",
            timeout=3600,
        )
        took = time.perf_counter() - started
        await transaction.rollback()
    finally:
        await connection.close()
    return took


async def main(devices: int) -> None:
    admin_url = os.environ["DATABASE_URL"]
    name = f"migration_timings_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))
    migrations = load_migrations()
    repository = await Repository.connect(url, 1)
    try:
        await repository.apply_migrations(migrations[:LOADED_BEFORE])
        started = time.perf_counter()
        await seed(url, devices)
        print(f"loaded {devices:,} devices in {time.perf_counter() - started:.1f} s")
        for count in range(LOADED_BEFORE + 1, len(migrations) + 1):
            if migrations[count - 1].version == PARTITIONED_IN:
                await seed(url, devices, SEED_BEFORE_0015)
            started = time.perf_counter()
            await repository.apply_migrations(migrations[:count])
            migration = migrations[count - 1]
            took = time.perf_counter() - started
            print(f"{migration.version:04d}_{migration.name}: {took:.2f} s")
        print(f"one index build on devices (rolled back): {await index_build(url):.2f} s")
    finally:
        await repository.close()
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=1_000_000)
    asyncio.run(main(parser.parse_args().devices))

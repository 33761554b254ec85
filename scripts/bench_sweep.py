#!/usr/bin/env python
"""Sweep benchmark: one `license-worker sweep --once` over a large fleet whose every device
has been silent past the window (docs/benchmarks.md).

    .venv/bin/python scripts/bench_sweep.py [--devices 1000000] [--runs 3]

Needs KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL (`bash scripts/bench.sh --sweep` starts local
services). Per run, in a fresh database:
  1. loads the fleet with set-based SQL: 1,000 devices a customer, three devices a user (one
     business, two personal), every tenth device unassigned, all last seen 40 days before
     the sweep's `--now`, each user and unassigned device holding an active license;
  2. baseline: Postgres alone reads every candidate the sweep must decide (the devices of
     those users, with their licenses) - the floor any sweep pays;
  3. the real CLI, `license-worker sweep --once --now T`, as a subprocess (outage guard
     overridden: this mass release is the point), timed and its peak RSS sampled;
  4. checks the result: every license released, one release event per license in the outbox.
A second, incremental sweep right after (nothing new to decide) is timed too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from worker.db.repository import Repository  # noqa: E402
from worker.db.sql_files import load_migrations  # noqa: E402

NOW = datetime(2026, 12, 30, tzinfo=UTC)
LOAD_FLEET = """
INSERT INTO customers (customer_id)
SELECT 'cust-' || c FROM generate_series(0, $1 / 1000 - 1) AS c;

INSERT INTO devices (customer_id, device_id, user_id, device_kind, first_seen_at, last_seen_at,
                     last_present_at, last_installed_at)
SELECT 'cust-' || (n / 1000),
       'dev-' || n,
       CASE WHEN n % 10 = 9 THEN NULL ELSE 'user-' || (n / 3) || '@example.com' END,
       CASE WHEN n % 3 = 0 THEN 'business' ELSE 'personal' END,
       $2::timestamptz - interval '100 days',
       $2::timestamptz - interval '40 days',
       $2::timestamptz - interval '40 days',
       $2::timestamptz - interval '100 days'
FROM generate_series(0, $1 - 1) AS n;

INSERT INTO users (customer_id, user_id, email, first_seen_at, last_seen_at)
SELECT DISTINCT customer_id, user_id, user_id, first_seen_at, last_seen_at
FROM devices WHERE user_id IS NOT NULL;

INSERT INTO licenses (customer_id, subject_type, subject_id, active, basis, allocated_at,
                      allocation_reason)
SELECT customer_id, 'user', user_id, true, 'user', first_seen_at, 'first_signal' FROM users
UNION ALL
SELECT customer_id, 'device', device_id, true, 'unassigned', first_seen_at, 'first_signal'
FROM devices WHERE user_id IS NULL;

ANALYZE;
"""
BASELINE_READ = """
SELECT count(*), count(l.subject_id)
FROM devices AS d
LEFT JOIN licenses AS l
  ON l.customer_id = d.customer_id
 AND l.subject_type = CASE WHEN d.user_id IS NULL THEN 'device' ELSE 'user' END
 AND l.subject_id = coalesce(d.user_id, d.device_id)
WHERE d.protected AND d.last_seen_at < $1
"""


def database_url_for(base: str, name: str) -> str:
    return urlunsplit(urlsplit(base)._replace(path=f"/{name}"))


async def fresh_database(base_url: str, devices: int) -> str:
    name = f"bench_sweep_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database_url_for(base_url, "postgres"))
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    url = database_url_for(base_url, name)
    repository = await Repository.connect(url, 1)
    await repository.apply_migrations(load_migrations())
    await repository.close()
    connection = await asyncpg.connect(url)
    try:
        for statement in LOAD_FLEET.split(";\n"):
            if statement.strip():
                await connection.execute(
                    statement,
                    *(
                        [devices, NOW]
                        if "$2" in statement
                        else [devices]
                        if "$1" in statement
                        else []
                    ),
                )
    finally:
        await connection.close()
    return url


async def drop_database(base_url: str, url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    admin = await asyncpg.connect(database_url_for(base_url, "postgres"))
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


async def timed_query(url: str, sql: str, *args: object) -> tuple[float, object]:
    connection = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        row = await connection.fetchrow(sql, *args)
        return time.perf_counter() - started, tuple(row)
    finally:
        await connection.close()


def run_sweep(url: str, topic_suffix: str) -> tuple[float, float, str]:
    """The real CLI; returns (seconds, peak RSS MiB, its JSON report)."""
    environment = {
        **os.environ,
        "DATABASE_URL": url,
        "GUARD_OVERRIDE": "true",
        "LOG_LEVEL": "warning",
        "LOG_FORMAT": "json",
        "HEARTBEAT_TOPIC": f"bench-sweep-heartbeat-{topic_suffix}",
        "LIFECYCLE_TOPIC": f"bench-sweep-lifecycle-{topic_suffix}",
    }
    started = time.perf_counter()
    process = subprocess.Popen(
        [str(REPO / ".venv/bin/license-worker"), "sweep", "--once", "--now", NOW.isoformat()],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        handle = psutil.Process(process.pid)
        while not done.is_set():
            try:
                peak = max(peak, handle.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"sweep failed ({process.returncode}):\n{stderr[-3000:]}")
    return seconds, peak / 2**20, stdout


async def one_run(base_url: str, devices: int) -> dict[str, float]:
    load_started = time.perf_counter()
    url = await fresh_database(base_url, devices)
    load_seconds = time.perf_counter() - load_started
    try:
        baseline_seconds, _ = await timed_query(url, BASELINE_READ, NOW - timedelta(days=30))
        suffix = uuid.uuid4().hex[:8]
        sweep_seconds, peak_mib, _ = run_sweep(url, suffix)
        released = await timed_query(
            url, "SELECT count(*) FILTER (WHERE active), count(*) FROM licenses"
        )
        events = await timed_query(
            url, "SELECT count(*) FROM license_outbox WHERE payload->>'type' = 'license.released'"
        )
        active, total = released[1]  # type: ignore[misc]
        if active != 0 or events[1][0] != total:  # type: ignore[index]
            raise SystemExit(f"sweep incomplete: {active} active of {total}, {events[1][0]} events")
        again_seconds, again_peak, _ = run_sweep(url, suffix)
    finally:
        await drop_database(base_url, url)
    return {
        "devices": devices,
        "licenses_released": total,
        "load_seconds": load_seconds,
        "baseline_read_seconds": baseline_seconds,
        "sweep_seconds": sweep_seconds,
        "sweep_to_baseline_ratio": sweep_seconds / baseline_seconds,
        "sweep_peak_rss_mib": peak_mib,
        "incremental_sweep_seconds": again_seconds,
        "incremental_peak_rss_mib": again_peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    arguments = parser.parse_args()
    base_url = os.environ["DATABASE_URL"]
    results = []
    for number in range(1, arguments.runs + 1):
        result = asyncio.run(one_run(base_url, arguments.devices))
        results.append(result)
        print(
            f"run {number}: "
            + ", ".join(
                f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
            ),
            flush=True,
        )
    print("\nmedian of", len(results), "runs:")
    for key in results[0]:
        values = [result[key] for result in results]
        each = ", ".join(f"{value:.2f}" for value in values)
        print(f"  {key:>28}: {statistics.median(values):.2f}   runs: {each}")


if __name__ == "__main__":
    main()

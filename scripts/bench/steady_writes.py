"""What one written heartbeat of a known device costs the database in the steady state: the
batches the last-seen precision lets through (every device stored, its last seen moved by the
precision or more, nothing else changed), through the worker's own write path
(`write_and_decide`, as the ingestion loop runs it, remembering what it wrote) without Kafka.

    .venv/bin/python -m scripts.bench.steady_writes --devices 5000 --batches 3

Needs DATABASE_URL (a superuser: the script creates and drops a database of its own) and
PSEUDONYM_KEY_FILE, as `deploy/local/services.sh start` exports them. The fleet (installs with
a user, three devices a user, every tenth device without one, as the benchmark's) is stored
first; then each measured batch is one heartbeat of every device, 15 minutes after the
previous, offered to `refresh_devices` as the loop offers the devices it remembers
(`--no-refresh`: all through `upsert_devices`, as before). The backend's CPU is read from
/proc, so the database must run on this machine.
Figures are indicative on a shared machine."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import psutil

from schemas import AGENT_EVENT_ADAPTER
from scripts.bench.first_sightings import FUTURE_TOLERANCE, StatementLog, statements_of
from scripts.bench.scenario import Services, drop_database
from worker.db.repository import Repository
from worker.db.session import Session
from worker.db.sql_files import load_migrations
from worker.ingest.coalesce import BatchChanges, coalesce
from worker.ingest.decoding import AgentEventModel
from worker.ingest.loop import write_and_decide
from worker.settings import Settings
from worker.sim.fleet import SimulatedDevice, agent_event, build_fleet

STEP = timedelta(minutes=15)


def fleet_events(
    fleet: list[SimulatedDevice], event_type: str, at: datetime
) -> list[AgentEventModel]:
    return [
        AGENT_EVENT_ADAPTER.validate_python(agent_event(device, event_type, at)) for device in fleet
    ]


async def write_batch(
    connection: asyncpg.Connection,
    changes: BatchChanges,
    settings: Settings,
    now: datetime,
    refresh: bool = False,
) -> StatementLog:
    """One batch in one transaction, as the ingestion loop writes it; `refresh`: every device
    is offered to `refresh_devices`, as the loop does once it remembers them all."""
    with statements_of(connection) as log:
        async with connection.transaction():
            await write_and_decide(
                Session(connection),
                changes,
                [],
                settings,
                now,
                remember=True,
                refresh=set(changes.devices) if refresh else (),
            )
    return log


async def measure(
    url: str, devices: int, customers: int, batches: int, refresh: bool
) -> dict[str, Any]:
    settings = Settings(database_url=url)
    fleet = build_fleet(customers, max(1, devices // customers))
    start = datetime.now(UTC) - STEP * (batches + 2)
    connection = await asyncpg.connect(url)
    try:
        backend = psutil.Process(await connection.fetchval("SELECT pg_backend_pid()"))
        installs = coalesce(fleet_events(fleet, "install", start), start, FUTURE_TOLERANCE)
        await write_batch(connection, installs, settings, start)
        runs = []
        for number in range(batches + 1):  # the first: plans and type introspection
            at = start + STEP * (number + 1)
            changes = coalesce(fleet_events(fleet, "heartbeat", at), at, FUTURE_TOLERANCE)
            cpu_before = sum(backend.cpu_times()[:2])
            started, worker_before = time.perf_counter(), time.process_time()
            log = await write_batch(connection, changes, settings, at, refresh)
            elapsed, worker = time.perf_counter() - started, time.process_time() - worker_before
            cpu = sum(backend.cpu_times()[:2]) - cpu_before
            if number:
                runs.append((log, elapsed, cpu, len(changes.devices), worker))
    finally:
        await connection.close()
    return {
        "devices_per_batch": runs[-1][3],
        "statements_per_batch": [log.count for log, *_ in runs],
        "postgres_cpu_us_per_device": statistics.median(
            cpu * 1e6 / count for _, _, cpu, count, _ in runs
        ),
        "worker_cpu_us_per_device": statistics.median(
            worker * 1e6 / count for _, _, _, count, worker in runs
        ),
        "wall_ms_per_batch": statistics.median(elapsed * 1e3 for _, elapsed, *_ in runs),
        "statement_ms": {
            name: round(statistics.median(log.seconds[name] for log, *_ in runs) * 1e3, 1)
            for name in runs[-1][0].names
        },
    }


async def main(arguments: argparse.Namespace) -> None:
    services = Services("unused", os.environ["DATABASE_URL"])
    name = f"bench_steady_writes_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(services.database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = services.database_url_for(name)
    repository = await Repository.connect(url, 1)
    try:
        await repository.apply_migrations(load_migrations())
    finally:
        await repository.close()
    try:
        result = await measure(
            url, arguments.devices, arguments.customers, arguments.batches, not arguments.no_refresh
        )
    finally:
        await drop_database(services, name)
    print(f"devices per batch: {result['devices_per_batch']}")
    print(f"statements per batch: {result['statements_per_batch']}")
    postgres = result["postgres_cpu_us_per_device"]
    print(f"Postgres CPU-µs per written heartbeat (median): {postgres:.1f}")
    worker = result["worker_cpu_us_per_device"]
    print(f"write path CPU-µs per written heartbeat (median, this process): {worker:.1f}")
    print(f"wall ms per batch (median): {result['wall_ms_per_batch']:.0f}")
    print("statement ms (median, client-side):")
    for statement, milliseconds in result["statement_ms"].items():
        print(f"  {statement:32} {milliseconds:8.1f}")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=5000, help="devices, each once a batch")
    parser.add_argument("--customers", type=int, default=100)
    parser.add_argument("--batches", type=int, default=3, help="batches measured (median)")
    parser.add_argument(
        "--no-refresh",
        action="store_true",
        help="write every device with upsert_devices (the path before refresh_devices)",
    )
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_arguments()))

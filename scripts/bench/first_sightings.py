"""What a batch of new devices costs the database: statements (round trips) per batch, their
time by name, and the CPU of the Postgres backend per new device, for the worker's own write
path (`write_and_decide`, as the ingestion loop runs it) without Kafka.

    .venv/bin/python -m scripts.bench.first_sightings --devices 5000 --batches 3

Needs DATABASE_URL (a superuser: the script creates and drops a database of its own) and
PSEUDONYM_KEY_FILE, as `deploy/local/services.sh start` exports them. Each batch is a
heartbeat, kind given, of `--devices` devices never seen before (the `first_sighting` shape of
`make bench`), spread over `--customers` customers. The backend's CPU is read from /proc, so
the database must run on this machine. Figures are indicative on a shared machine."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import psutil

from schemas import AGENT_EVENT_ADAPTER
from scripts.bench.scenario import Services, drop_database
from worker.db.repository import Repository
from worker.db.session import Session
from worker.db.sql_files import load_migrations, queries
from worker.ingest.coalesce import BatchChanges, coalesce
from worker.ingest.decoding import AgentEventModel
from worker.ingest.loop import write_and_decide
from worker.settings import Settings
from worker.sim.fleet import agent_event, build_fleet

FUTURE_TOLERANCE = timedelta(minutes=5)


@dataclass(eq=False)
class StatementLog:
    """The statements a connection ran (asyncpg's query logger), by query name where the text
    is a named query (`sql/queries/*.sql`), with their time as the client saw it."""

    names: list[str] = field(default_factory=list)
    seconds: Counter[str] = field(default_factory=Counter)

    def __call__(self, record: Any) -> None:
        name = _NAMES.get(record.query.strip(), record.query.strip().split()[0].upper())
        self.names.append(name)
        self.seconds[name] += record.elapsed

    @property
    def count(self) -> int:
        return len(self.names)


_NAMES = {text.strip(): name for name, text in queries().items()}


@contextmanager
def statements_of(connection: asyncpg.Connection) -> Iterator[StatementLog]:
    """Logs every statement `connection` runs inside the block."""
    log = StatementLog()
    with connection.query_logger(log):
        yield log


def first_sighting_events(devices: int, customers: int, at: datetime) -> list[AgentEventModel]:
    """One heartbeat, kind given, of each of `devices` new devices (ids unique per call)."""
    tag = uuid.uuid4().hex[:8]
    fleet = build_fleet(customers, max(1, devices // customers))
    events = []
    for device in fleet:
        event = agent_event(device, "heartbeat", at)
        event["device_kind"] = device.kind
        event["customer_id"] = f"{device.customer_id}-{tag}"
        events.append(AGENT_EVENT_ADAPTER.validate_python(event))
    return events


async def write_batch(
    connection: asyncpg.Connection, changes: BatchChanges, settings: Settings, now: datetime
) -> StatementLog:
    """One batch through the worker's write path, in one transaction; its statements."""
    with statements_of(connection) as log:
        async with connection.transaction():
            await write_and_decide(Session(connection), changes, [], settings, now)
    return log


async def measure(url: str, devices: int, customers: int, batches: int) -> dict[str, Any]:
    settings = Settings(database_url=url)
    connection = await asyncpg.connect(url)
    try:
        backend = psutil.Process(await connection.fetchval("SELECT pg_backend_pid()"))
        # A first batch, not measured: asyncpg's type introspection, the first plans.
        warm_up = first_sighting_events(min(devices, 100), customers, datetime.now(UTC))
        await write_batch(
            connection,
            coalesce(warm_up, datetime.now(UTC), FUTURE_TOLERANCE),
            settings,
            datetime.now(UTC),
        )
        runs = []
        for _ in range(batches):
            now = datetime.now(UTC)
            events = first_sighting_events(devices, customers, now)
            changes = coalesce(events, now, FUTURE_TOLERANCE)
            cpu_before = sum(backend.cpu_times()[:2])
            started, worker_before = time.perf_counter(), time.process_time()
            log = await write_batch(connection, changes, settings, now)
            elapsed, worker = time.perf_counter() - started, time.process_time() - worker_before
            cpu = sum(backend.cpu_times()[:2]) - cpu_before
            runs.append((log, elapsed, cpu, len(changes.devices), worker))
    finally:
        await connection.close()
    new_devices = runs[-1][3]
    return {
        "new_devices_per_batch": new_devices,
        "statements_per_batch": [log.count for log, *_ in runs],
        "postgres_cpu_us_per_new_device": statistics.median(
            cpu * 1e6 / count for _, _, cpu, count, _ in runs
        ),
        # The write path's own CPU (this process: encoding, decisions, decoding results).
        "worker_cpu_us_per_new_device": statistics.median(
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
    name = f"bench_first_sightings_{uuid.uuid4().hex[:8]}"
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
        result = await measure(url, arguments.devices, arguments.customers, arguments.batches)
    finally:
        await drop_database(services, name)
    print(f"new devices per batch: {result['new_devices_per_batch']}")
    print(f"statements per batch: {result['statements_per_batch']}")
    cpu = result["postgres_cpu_us_per_new_device"]
    print(f"Postgres CPU-µs per new device (median): {cpu:.1f}")
    worker = result["worker_cpu_us_per_new_device"]
    print(f"write path CPU-µs per new device (median, this process): {worker:.1f}")
    print(f"wall ms per batch (median): {result['wall_ms_per_batch']:.0f}")
    print("statement ms (median, client-side):")
    for statement, milliseconds in result["statement_ms"].items():
        print(f"  {statement:32} {milliseconds:8.1f}")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=5000, help="new devices per batch")
    parser.add_argument("--customers", type=int, default=100)
    parser.add_argument("--batches", type=int, default=3, help="batches measured (median)")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_arguments()))

"""Storage measurement for the sizing (docs/scaling.md, "Sizing"): the real worker over a
simulated fleet on a fresh database and fresh topics, then rows and bytes per table.

    eval "$(bash deploy/local/services.sh start)"
    .venv/bin/python -m scripts.storage_growth [--customers 20 --devices-per-customer 500]
        [--output docs/measurements/storage-growth-YYYY-MM-DD.json]

Needs KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL (a superuser's, as the tests) and
PSEUDONYM_KEY_FILE. The worker runs in this process on a set clock (the integration tests'
helpers: tests/integration/license_support.py), with the production last-seen precision and
settle window. Phases, each ingested (and its license events published) before the rows of
every table are counted:

  install     every device installs and heartbeats (day 0)
  heartbeats  three heartbeat rounds of every device, 20 minutes apart (past the precision)
  snapshots   a heartbeat round and one sweep a day, days 1 to 9: the daily usage snapshots,
              nothing released (the devices of one user in ten, and one unassigned device in
              ten, fall silent after day 0 without uninstalling)
  uninstall   day 10: the devices of another user in ten, and unassigned ones, uninstall
  reinstall   day 12: half of those (by user) install again, the same device ids
  release     heartbeats of the installed devices on days 20, 30, 40; one sweep on day 42
              releases the licenses of the devices silent since day 0
  purge       heartbeats on days 50 to 130; one sweep on day 133 purges the users released
              on days 10 and 42 (90 days of PERSONAL_DATA_RETENTION_DAYS) and the silent
              unassigned devices' host names

Then VACUUM ANALYZE and, per table: rows, bytes with indexes and TOAST
(pg_total_relation_size), heap and index bytes; and the same after VACUUM FULL (compact: the
free space the heartbeats' updates leave in `devices` and `users` and their indexes gone).
The result JSON has per phase the rows each table gained or lost and the events that caused
them, and per table the bytes per row.
Nothing here decides sizes: scripts/sizing.py reads this file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from tests.integration.license_support import ingest, publish_outbox, send, sweep
from tests.service_fixtures import fresh_topic_names
from tests.support import Services, create_topics, make_settings, migrate_database
from worker.settings import Settings
from worker.sim.fleet import SimulatedDevice, build_fleet

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / ".local" / "storage-growth.json"

# An index's metapage is there even when the table is empty: not a cost of a row.
INDEX_METAPAGE_BYTES = 8192

# Per table of the public schema, a partitioned one (#15 part 3) with its partitions summed
# (the parent has no storage of its own): every leaf table's forks, indexes and TOAST.
TABLE_SIZES = """
SELECT COALESCE(pg_partition_root(c.oid), c.oid)::regclass::text AS table_name,
       count(*) AS partitions,
       sum(pg_total_relation_size(c.oid))::bigint AS total_bytes,
       sum(pg_relation_size(c.oid))::bigint AS heap_bytes,
       sum(pg_indexes_size(c.oid))::bigint AS index_bytes,
       sum(COALESCE(pg_relation_size(NULLIF(c.reltoastrelid, 0)), 0))::bigint AS toast_bytes,
       sum((SELECT count(*) FROM pg_index AS i WHERE i.indrelid = c.oid))::bigint AS indexes
FROM pg_class AS c
JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind = 'r'
GROUP BY 1
ORDER BY 1
"""

# Tables as the sizing sees them: a partitioned table, not its partitions.
ROOT_TABLES = """
SELECT c.relname
FROM pg_class AS c
JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
"""


@dataclass
class Simulation:
    services: Services
    settings: Settings
    superuser_url: str
    fleet: list[SimulatedDevice]
    start: datetime
    sent: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    phases: list[dict[str, Any]] = field(default_factory=list)

    def day(self, number: float) -> datetime:
        return self.start + timedelta(days=number)

    async def signal(self, events: list[tuple[SimulatedDevice, str, datetime]]) -> None:
        """Sends agent events and runs the worker until they are stored and their license
        events published (the clock at the last event's time plus a minute)."""
        if not events:
            return
        self.sent += await send(self.services, self.settings, events)
        at = max(when for _, _, when in events) + timedelta(minutes=1)
        await ingest(self.services, self.settings, at, self.sent)
        await publish_outbox(self.settings, at + timedelta(hours=1))

    async def heartbeats(self, devices: list[SimulatedDevice], at: datetime) -> None:
        await self.signal([(device, "heartbeat", at) for device in devices])

    async def phase(self, name: str, events: dict[str, int]) -> None:
        """Records the rows every table gained (or lost) since the previous phase."""
        counts = await row_counts(self.superuser_url)
        delta = {
            table: counts[table] - self.counts.get(table, 0)
            for table in counts
            if counts[table] != self.counts.get(table, 0)
        }
        self.counts = counts
        self.phases.append({"phase": name, "events": events, "rows_added": delta})
        log(f"{name}: {events}; rows {delta}")


async def row_counts(url: str) -> dict[str, int]:
    connection = await asyncpg.connect(url)
    try:
        tables = [row["relname"] for row in await connection.fetch(ROOT_TABLES)]
        return {
            table: int(await connection.fetchval(f'SELECT count(*) FROM "{table}"'))
            for table in sorted(tables)
        }
    finally:
        await connection.close()


async def table_sizes(url: str) -> dict[str, dict[str, Any]]:
    """The sizes after VACUUM ANALYZE (free space of updated rows kept, as a live table
    has it), each with its compact size after VACUUM FULL (a lower bound) beside it."""
    measured = await _sizes(url, "VACUUM ANALYZE")
    compact = await _sizes(url, "VACUUM FULL ANALYZE")
    for table, sizes in measured.items():
        sizes["compact_row_bytes"] = compact[table]["row_bytes"]
        sizes["compact_bytes_per_row"] = compact[table]["bytes_per_row"]
    return measured


async def _sizes(url: str, vacuum: str) -> dict[str, dict[str, Any]]:
    """Per table, after `vacuum`: rows; bytes of every fork, index and TOAST
    (pg_total_relation_size); and the bytes that grow with the rows: heap, indexes less their
    metapages, and TOAST data (without the free space and visibility maps, a few pages a
    table). bytes_per_row is the latter over the rows (None for an empty table)."""
    counts = await row_counts(url)
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(vacuum)
        sizes = {}
        for row in await connection.fetch(TABLE_SIZES):
            rows = counts[row["table_name"]]
            payload = (
                row["heap_bytes"]
                + row["index_bytes"]
                - INDEX_METAPAGE_BYTES * row["indexes"]
                + row["toast_bytes"]
            )
            sizes[row["table_name"]] = {
                "rows": rows,
                "partitions": row["partitions"],
                "total_bytes": row["total_bytes"],
                "heap_bytes": row["heap_bytes"],
                "index_bytes": row["index_bytes"],
                "toast_bytes": row["toast_bytes"],
                "indexes": row["indexes"],
                "row_bytes": payload,
                "bytes_per_row": round(payload / rows, 1) if rows else None,
            }
        return sizes
    finally:
        await connection.close()


@dataclass(frozen=True)
class Churn:
    """Who leaves and how, by position: devices of one user in ten (and one unassigned
    device in ten) uninstall on day 10, half of them install again on day 12; the devices of
    another user in ten (and unassigned ones) fall silent after day 0 without uninstalling."""

    leaving: list[SimulatedDevice]
    returning: list[SimulatedDevice]
    silent: list[SimulatedDevice]

    @classmethod
    def of(cls, fleet: list[SimulatedDevice]) -> Churn:
        """Picked within each customer (a customer losing a large share of its licenses at
        once would be held by the sweeper's outage guard, GUARD_MAX_RELEASE_SHARE)."""

        def pick(first: int, step: int) -> list[SimulatedDevice]:
            chosen: list[SimulatedDevice] = []
            for customer in sorted({d.customer_id for d in fleet}):
                devices = [d for d in fleet if d.customer_id == customer]
                users = sorted({d.user_id for d in devices if d.user_id is not None})
                picked = set(users[first::step])
                unassigned = [d for d in devices if d.user_id is None]
                chosen += [d for d in devices if d.user_id in picked] + unassigned[first::step]
            return chosen

        return cls(leaving=pick(0, 10), returning=pick(0, 20), silent=pick(5, 10))

    def installed(self, fleet: list[SimulatedDevice]) -> list[SimulatedDevice]:
        """The devices heartbeating after day 12."""
        gone = {d.key for d in self.leaving + self.silent} - {d.key for d in self.returning}
        return [d for d in fleet if d.key not in gone]


async def simulate(simulation: Simulation) -> None:
    fleet, day = simulation.fleet, simulation.day
    customers = len({d.customer_id for d in fleet})
    await simulation.phase("empty", {})

    # Installs stored before the first heartbeats, as an agent sends them (the two topics
    # have no order between them: a heartbeat read first would add a device_history row).
    await simulation.signal([(d, "install", day(0)) for d in fleet])
    await simulation.heartbeats(fleet, day(0) + timedelta(minutes=1))
    await simulation.phase("install", {"installs": len(fleet), "heartbeats": len(fleet)})

    for minutes in (20, 40, 60):
        await simulation.heartbeats(fleet, day(0) + timedelta(minutes=minutes))
    await simulation.phase("heartbeats", {"heartbeats": 3 * len(fleet)})

    churn = Churn.of(fleet)
    snapshot_days = range(1, 10)
    staying = [d for d in fleet if d not in set(churn.silent)]
    for number in snapshot_days:
        await simulation.heartbeats(staying, day(number))
        report = await sweep(simulation.settings, day(number) + timedelta(minutes=5))
        if report.released or report.purged:
            raise RuntimeError(f"day {number}: nothing should be released yet: {report}")
    await simulation.phase(
        "snapshots",
        {
            "sweep_days": len(snapshot_days),
            "customer_days": customers * len(snapshot_days),
            "heartbeats": len(snapshot_days) * len(staying),
        },
    )

    await simulation.signal([(d, "uninstall", day(10)) for d in churn.leaving])
    await simulation.phase("uninstall", {"uninstalls": len(churn.leaving)})

    await simulation.signal([(d, "install", day(12)) for d in churn.returning])
    await simulation.phase("reinstall", {"reinstalls": len(churn.returning)})

    installed = churn.installed(fleet)
    for number in (20, 30, 40):
        await simulation.heartbeats(installed, day(number))
    released = await sweep(simulation.settings, day(42))
    await simulation.phase(
        "release",
        {
            "heartbeats": 3 * len(installed),
            "silent_devices": len(churn.silent),
            "released": released.released,
            "customer_days": customers,
        },
    )

    rounds = range(50, 131, 10)
    for number in rounds:
        await simulation.heartbeats(installed, day(number))
    purged = await sweep(simulation.settings, day(133))
    await simulation.phase(
        "purge",
        {
            "heartbeats": len(rounds) * len(installed),
            "purged_users": purged.purged,
            "purged_devices": purged.purged_devices,
            "customer_days": customers,
        },
    )


def services_from_environment() -> Services:
    kafka, database = os.environ.get("KAFKA_BOOTSTRAP_SERVERS"), os.environ.get("DATABASE_URL")
    if not kafka or not database or not os.environ.get("PSEUDONYM_KEY_FILE"):
        raise SystemExit(
            "KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL and PSEUDONYM_KEY_FILE must be set: "
            'eval "$(bash deploy/local/services.sh start)"'
        )
    return Services(kafka, database)


async def measure_fleet(
    services: Services, customers: int, devices_per_customer: int
) -> dict[str, Any]:
    """The simulation in a fresh database and fresh topics (both removed afterwards), and
    its result as written to the JSON file."""
    url = await services.create_database("license_storage")
    began = time.perf_counter()
    try:
        await services.set_up_roles(url, set_passwords=True)
        await migrate_database(services.owner_url(url))
        await services.set_up_roles(url)  # the grants on the tables the migrations made
        topics = fresh_topic_names()
        await create_topics(services.kafka_bootstrap_servers, topics, partitions=4)
        key_file = os.environ.get("PSEUDONYM_KEY_FILE")
        settings = make_settings(
            services,
            services.worker_url(url),
            topics,
            # Production defaults (the tests' helpers set 0 for both).
            last_seen_precision_seconds=900,
            allocation_settle_seconds=300,
            # Only the sweeps of the phases run (a sweeper inside the ingesting worker would
            # take snapshots and release at the ingestion's times).
            sweep_enabled=False,
            **({"pseudonym_key_file": Path(key_file)} if key_file else {}),
        )
        # The sweeper compares its clock with the broker's timestamps: start a day ago.
        start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
        fleet = build_fleet(customers, devices_per_customer, seed=8)
        simulation = Simulation(services, settings, services.superuser_url(url), fleet, start)
        await simulate(simulation)
        tables = await table_sizes(simulation.superuser_url)
        postgres = await _server_version(services)
    finally:
        await services.drop_database(url)
    return {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "postgres": postgres,
        "fleet": {
            "customers": customers,
            "devices_per_customer": devices_per_customer,
            "devices": len(fleet),
            "users": len({d.user_id for d in fleet if d.user_id}),
            "unassigned_devices": sum(1 for d in fleet if d.user_id is None),
        },
        "settings": {
            "last_seen_precision_seconds": settings.last_seen_precision_seconds,
            "allocation_settle_seconds": settings.allocation_settle_seconds,
            "license_release_days": settings.license_release_days,
            "personal_data_retention_days": settings.personal_data_retention_days,
        },
        "phases": simulation.phases,
        "tables": tables,
        "seconds": round(time.perf_counter() - began, 1),
    }


async def _server_version(services: Services) -> str:
    connection = await asyncpg.connect(services.admin_url())
    try:
        return str(await connection.fetchval("SHOW server_version"))
    finally:
        await connection.close()


def log(message: str) -> None:
    print(f"[storage] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.storage_growth", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--customers", type=int, default=20)
    parser.add_argument("--devices-per-customer", type=int, default=500)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    if args.customers < 1 or args.devices_per_customer < 10:
        parser.error("--customers must be at least 1 and --devices-per-customer at least 10")
    services = services_from_environment()
    result = asyncio.run(measure_fleet(services, args.customers, args.devices_per_customer))
    result["command"] = " ".join(["python -m scripts.storage_growth", *sys.argv[1:]])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    log(f"written to {args.output} in {result['seconds']} s")


if __name__ == "__main__":
    main()

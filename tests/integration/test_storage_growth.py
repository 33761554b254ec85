"""The storage measurement behind the sizing (scripts/storage_growth.py, docs/scaling.md
"Sizing"): the real worker over a small simulated fleet, on real Kafka and Postgres, and the
sizes of tables, partitioned ones counted whole."""

from __future__ import annotations

import asyncpg

from scripts.sizing import GROWING_TABLES, STATE_TABLES, storage_basis
from scripts.storage_growth import measure_fleet, table_sizes
from tests.support import Services


async def test_a_partitioned_table_is_measured_whole_with_its_partitions(
    services: Services,
) -> None:
    """Monthly partitions (#15 part 3) keep their rows in the partitions: the parent has no
    storage of its own, and the partitions are not tables of their own for the sizing."""
    url = await services.create_database("license_sizes")
    try:
        connection = await asyncpg.connect(url)
        try:
            await connection.execute(
                """
                CREATE TABLE events (customer_id text, day date, body text,
                                     PRIMARY KEY (customer_id, day)) PARTITION BY RANGE (day);
                CREATE TABLE events_2026_11 PARTITION OF events
                    FOR VALUES FROM ('2026-11-01') TO ('2026-12-01');
                CREATE TABLE events_2026_12 PARTITION OF events
                    FOR VALUES FROM ('2026-12-01') TO ('2027-01-01');
                CREATE TABLE plain (id int PRIMARY KEY);
                INSERT INTO events
                SELECT 'customer-' || n, date '2026-11-01' + (n % 61), repeat('x', 100)
                FROM generate_series(1, 3000) AS n;
                INSERT INTO plain SELECT generate_series(1, 10);
                """
            )
        finally:
            await connection.close()
        sizes = await table_sizes(url)
    finally:
        await services.drop_database(url)
    assert set(sizes) == {"events", "plain"}
    events = sizes["events"]
    assert events["rows"] == 3000
    assert events["partitions"] == 2
    # Two partitions' heaps and primary keys: well over the 100-byte bodies.
    assert 150 < events["bytes_per_row"] < 400
    assert events["compact_bytes_per_row"] is not None


async def test_a_small_fleet_gives_every_figure_the_sizing_needs(services: Services) -> None:
    result = await measure_fleet(services, customers=2, devices_per_customer=40)
    phases = {phase["phase"]: phase for phase in result["phases"]}
    assert phases["install"]["rows_added"]["devices"] == 80
    # Heartbeats update rows in place: no table gains a row.
    assert not set(phases["heartbeats"]["rows_added"]) & set(GROWING_TABLES + STATE_TABLES)
    assert phases["snapshots"]["rows_added"]["usage_snapshots"] == 2 * 9
    assert phases["release"]["events"]["released"] > 0
    assert phases["purge"]["events"]["purged_users"] > 0
    basis = storage_basis(result, "test")
    assert basis.rows_per_event["install"]["devices"] == 1
    assert basis.rows_per_event["uninstall"]["device_lifecycle_events"] == 1
    assert basis.rows_per_event["retire_silent"]["license_history"] > 0
    assert all(value > 0 for value in basis.bytes_per_row.values())

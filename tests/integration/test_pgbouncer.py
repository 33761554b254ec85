"""The service through a real PgBouncer in pool_mode=transaction (issue #15 part 2;
docs/scaling.md, "PgBouncer"): three `license-worker run` replicas, real subprocesses, share
one PgBouncer (deploy/local/services.sh starts it) with DATABASE_STATEMENT_CACHE_SIZE=0.
Ingestion, license decisions, the sweeper's leadership (and its takeover when the leader
dies) and the relay; the stored state and the license events billing receives are checked,
each event on the topic exactly once.

PgBouncer's server connections are shared by every client: a session advisory lock, a
session `SET`, a prepared statement or a start-up parameter of one client does not follow it
to its next transaction. Under CI=true a missing PgBouncer fails these tests."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from tests.integration.license_support import send
from tests.support import (
    Services,
    WorkerProcess,
    committed_offsets_total,
    fetch,
    fetchval,
    make_settings,
    read_all,
    wait_until,
)
from worker.db.repository import Repository
from worker.settings import Settings
from worker.sim.fleet import SimulatedDevice

pytestmark = pytest.mark.integration

LEASE_SECONDS = 2.0
REPLICAS = 3


def kiosk(customer: str, number: int) -> SimulatedDevice:
    """A business device without a user: an unassigned device license while it signals."""
    return SimulatedDevice(customer, f"kiosk-{number}", None, "business")


async def test_the_worker_role_connects_through_pgbouncer_only_without_the_statement_cache(
    services: Services, database_url: str
) -> None:
    """Today's default (64 statements kept prepared, plan_cache_mode sent at start-up) is
    refused by PgBouncer before 1.21; DATABASE_STATEMENT_CACHE_SIZE=0 connects."""
    through = services.through_pgbouncer(database_url)
    with pytest.raises(Exception, match="unsupported startup parameter: plan_cache_mode"):
        await Repository.connect(through, 1)
    repository = await Repository.connect(through, 2, statement_cache_size=0)
    try:
        [row] = await repository.fetch("connected_as_superuser")
        assert row["rolsuper"] is False
    finally:
        await repository.close()


@pytest.fixture
def settings(services: Services, database_url: str, topics: dict[str, str]) -> Settings:
    return make_settings(
        services,
        services.through_pgbouncer(database_url),
        topics,
        database_statement_cache_size=0,
        leader_lease_seconds=LEASE_SECONDS,
        sweep_interval_seconds=0.5,
        relay_poll_seconds=0.2,
    )


async def test_three_replicas_through_one_pgbouncer(
    services: Services,
    settings: Settings,
    database_url: str,
    tmp_path: Path,
) -> None:
    replicas = [
        WorkerProcess(settings, tmp_path / f"replica-{i}.log").start() for i in range(REPLICAS)
    ]
    sent = 0
    try:
        # Wave 1: kiosks that keep signalling, and kiosks last heard from just under the
        # release window ago: allocated at ingestion, released by the sweeper seconds later.
        sent += await send_wave(services, settings, ["north", "south", "east"])
        await wait_for_the_fleet(services, settings, database_url, sent, active=9, released=6)
        sweepers = [r for r in replicas if '"sweep.leader_elected"' in r.log_text()]
        assert len(sweepers) == 1, "one sweeper leader among the replicas"
        relays = [r for r in replicas if lease_taken(r, "relay")]
        assert len(relays) == 1, "one relay leader among the replicas"
        assert all("Traceback" not in r.log_text() for r in replicas)

        # The sweeper leader dies (nothing is in flight: everything is published); another
        # replica takes its lease once it expired, and sweeps the second wave.
        leader = sweepers[0]
        leader.kill()
        sent += await send_wave(services, settings, ["west"])
        await wait_for_the_fleet(services, settings, database_url, sent, active=12, released=8)
        survivors = [r for r in replicas if r is not leader]
        assert sum('"sweep.leader_elected"' in r.log_text() for r in survivors) == 1
        for replica in survivors:
            assert replica.terminate() == 0
    finally:
        for replica in replicas:
            if replica.process is not None and replica.process.poll() is None:
                replica.kill()

    await check_billing_received_each_decision_once(services, settings, database_url)


async def send_wave(services: Services, settings: Settings, customers: list[str]) -> int:
    """Per customer: three kiosks heard from now, two heard from 30 days minus 40 seconds ago
    (their window ends within the test)."""
    now = datetime.now(UTC)
    fading = now - settings.license_window + timedelta(seconds=40)
    events: list[tuple[SimulatedDevice, str, datetime]] = []
    for customer in customers:
        events += [(kiosk(customer, n), "install", now - timedelta(minutes=1)) for n in (1, 2, 3)]
        events += [(kiosk(customer, n), "install", fading) for n in (4, 5)]
    return await send(services, settings, events)


async def wait_for_the_fleet(
    services: Services,
    settings: Settings,
    database_url: str,
    sent: int,
    *,
    active: int,
    released: int,
) -> None:
    """Until every message is committed, the licenses are as expected and every license
    event is published."""

    async def settled() -> bool:
        committed = await committed_offsets_total(
            services.kafka_bootstrap_servers, settings.consumer_group, settings.agent_topics
        )
        [row] = await fetch(
            database_url,
            "SELECT count(*) FILTER (WHERE active) AS active,"
            " count(*) FILTER (WHERE NOT active AND release_reason = 'inactive_30d') AS released,"
            " (SELECT count(*) FROM license_outbox WHERE published_at IS NULL) AS pending"
            " FROM licenses",
        )
        return committed >= sent and (row["active"], row["released"], row["pending"]) == (
            active,
            released,
            0,
        )

    await wait_until(settled, timeout=120, interval=0.5)


def lease_taken(replica: WorkerProcess, lease: str) -> bool:
    return any(
        record.get("event") == "lease.taken" and record.get("lease") == lease
        for record in log_records(replica)
    )


def log_records(replica: WorkerProcess) -> list[dict[str, Any]]:
    records = []
    for line in replica.log_text().splitlines():
        if line.startswith("{"):
            records.append(orjson.loads(line))
    return records


async def check_billing_received_each_decision_once(
    services: Services, settings: Settings, database_url: str
) -> None:
    outbox = await fetch(
        database_url,
        "SELECT event_id::text AS event_id, payload::text AS payload FROM license_outbox",
    )
    stored = {row["event_id"]: orjson.loads(row["payload"]) for row in outbox}
    records = await read_all(
        services.kafka_bootstrap_servers, settings.license_events_topic, len(stored) + 1, timeout=10
    )
    received = [orjson.loads(record.value) for record in records]
    ids = Counter(event["event_id"] for event in received)
    assert set(ids) == set(stored), "every stored decision reached the topic, nothing else"
    assert set(ids.values()) == {1}, "each exactly once"
    for event in received:
        assert event == stored[event["event_id"]]
    kinds = Counter(event["type"] for event in received if event["type"].startswith("license."))
    assert kinds == {"license.allocated": 20, "license.released": 8}
    released = [event for event in received if event["type"] == "license.released"]
    assert {event["subject_id"].rsplit("-", 1)[1] for event in released} == {"4", "5"}
    sequences = Counter(
        (event["customer_id"], event["subject_id"], event.get("sequence")) for event in received
    )
    assert set(sequences.values()) == {1}
    assert await fetchval(
        database_url, "SELECT holder IS NOT NULL FROM leases WHERE name = 'sweeper'"
    )


async def test_a_streamed_report_leaves_no_prepared_statement_on_the_server_connection(
    services: Services, database_url: str
) -> None:
    """A cursor (the report's detail rows) needs a prepared statement; a named one would stay
    on PgBouncer's server connection after the transaction, where another client's statement
    of the same name (asyncpg numbers them per process) then fails with "already exists".
    Here the stream is the transaction's last statement; the next client, in a fresh
    database's pool of one server connection, gets that server connection."""
    through = services.through_pgbouncer(database_url)
    repository = await Repository.connect(through, 1, statement_cache_size=0)
    try:
        async with repository.snapshot() as session:
            assert [row async for row in session.stream("sweep_state")] == []
        observer = await asyncpg.connect(through, statement_cache_size=0)
        try:
            left = await observer.fetchval("SELECT count(*) FROM pg_prepared_statements")
        finally:
            await observer.close()
    finally:
        await repository.close()
    assert left == 0

"""The minimal pipeline, the benchmark's peer: what draining heartbeats into a last-seen table
costs with nothing else to do, on the same events, broker and database as the worker.

Per batch: aiokafka `getmany` with the worker's consumer (`create_consumer` of the code under
test, so the same fetch settings) and its `batch_max_records`/`batch_max_wait_ms`; orjson;
a fold to the newest `occurred_at` per device; one `unnest` upsert with `GREATEST` (one
statement, so one transaction) into its own table, `bench_peer_last_seen`, created by the
benchmark in the scenario's database with the indexes a last-seen table needs (see
PEER_TABLE); then the offset commit. No validation, no licensing, no outbox, no metrics.
The next batch is fetched and folded while Postgres writes one.

Run by the benchmark as a subprocess (`python -m scripts.bench.peer ARGUMENTS_JSON`), so its
interpreter holds nothing else (the benchmark process holds every pre-encoded message); it
prints its result as one JSON line. Measured like the worker's drain: from the first batch
stored to the last offset committed, over the messages after the first batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from scripts.bench import log
from scripts.bench.code_under_test import CODE_DIR, REPO_ROOT, UnderTest, import_worker_modules
from scripts.bench.meters import CpuMeter, RssSampler
from scripts.bench.scenario import Scenario, Services
from scripts.bench.stages import RateResult

# What the sweeper of a last-seen table needs, as the worker's devices table has it
# (migration 0004): the key, and a day-granular column for the scan, so that a heartbeat
# changes nothing indexed within a day (a HOT update), with room on each page for it.
PEER_TABLE = """
CREATE TABLE bench_peer_last_seen (
    customer_id text NOT NULL,
    device_id text NOT NULL,
    last_seen_at timestamptz NOT NULL,
    last_seen_day date GENERATED ALWAYS AS ((last_seen_at AT TIME ZONE 'UTC')::date) STORED,
    PRIMARY KEY (customer_id, device_id)
) WITH (fillfactor = 80);
CREATE INDEX bench_peer_last_seen_by_day
    ON bench_peer_last_seen (last_seen_day, customer_id, device_id);
"""

# Only a newer time is written: an older or equal one leaves the row (and its page) alone.
UPSERT = """
INSERT INTO bench_peer_last_seen AS stored (customer_id, device_id, last_seen_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[])
ON CONFLICT (customer_id, device_id) DO UPDATE
    SET last_seen_at = GREATEST(stored.last_seen_at, EXCLUDED.last_seen_at)
    WHERE EXCLUDED.last_seen_at > stored.last_seen_at
"""

Newest = dict[tuple[str, str], datetime]


def newest_per_device(values: Iterable[bytes]) -> Newest:
    """The newest `occurred_at` of each (customer_id, device_id) among `values` (JSON agent
    events; trusted, as the peer validates nothing)."""
    newest: Newest = {}
    loads, parse, get = orjson.loads, datetime.fromisoformat, newest.get
    for value in values:
        event = loads(value)
        key = (event["customer_id"], event["device_id"])
        at = parse(event["occurred_at"])
        seen = get(key)
        if seen is None or at > seen:
            newest[key] = at
    return newest


def upsert_arguments(newest: Newest) -> tuple[list[str], list[str], list[datetime]]:
    """The upsert's three arrays, one element a device."""
    customers = [customer for customer, _ in newest]
    devices = [device for _, device in newest]
    return customers, devices, list(newest.values())


async def create_peer_table(database_url: str) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(PEER_TABLE)
    finally:
        await connection.close()


async def count_peer_devices(database_url: str) -> int:
    connection = await asyncpg.connect(database_url)
    try:
        return int(await connection.fetchval("SELECT count(*) FROM bench_peer_last_seen"))
    finally:
        await connection.close()


async def drain(arguments: dict[str, Any]) -> RateResult:
    """Reads `expected` messages from the group's committed offsets (or the beginning) and
    stores them as described above."""
    services = Services(arguments["kafka_bootstrap_servers"], arguments["database_url"])
    settings = UnderTest.Settings(
        kafka_bootstrap_servers=services.kafka_bootstrap_servers,
        database_url=arguments["database_url"],
        consumer_group=arguments["group"],
        unknown_customers="admit",
        **arguments["topics"],
    )
    expected: int = arguments["expected"]
    meter = CpuMeter([], services)  # its "bench" group is this process: the peer
    connection = await asyncpg.connect(arguments["database_url"])
    consumer = UnderTest.create_consumer(settings)
    consumer.subscribe(list(settings.agent_topics))
    started = time.perf_counter()
    deadline = started + arguments["limit_seconds"]
    count = batches = first_count = devices_written = 0
    first_at: float | None = None
    # While Postgres writes one batch, the next is fetched and folded (the worker overlaps
    # its decoding with its write too); a batch's write starts after the previous one's
    # offsets are committed, so commits stay in order.
    writing: asyncio.Task[str] | None = None
    writing_offsets: dict[Any, int] = {}
    writing_messages = 0
    await consumer.start()
    try:
        while count < expected:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"the peer stored only {count} of {expected} messages")
            newest: Newest | None = None
            if count + writing_messages < expected:
                records = await consumer.getmany(
                    timeout_ms=settings.batch_max_wait_ms, max_records=settings.batch_max_records
                )
                if records:
                    newest = newest_per_device(
                        message.value for messages in records.values() for message in messages
                    )
            if writing is not None:
                await writing
                await consumer.commit(writing_offsets)
                count += writing_messages
                batches += 1
                writing, writing_messages = None, 0
                if first_at is None:
                    first_at, first_count = time.perf_counter(), count
                    meter.start()
            if newest is not None:
                writing = asyncio.create_task(connection.execute(UPSERT, *upsert_arguments(newest)))
                writing_offsets = {
                    partition: messages[-1].offset + 1 for partition, messages in records.items()
                }
                writing_messages = sum(len(messages) for messages in records.values())
                devices_written += len(newest)
        finished = time.perf_counter()
        cores = meter.stop() if first_at is not None else {}
    finally:
        if writing is not None:
            writing.cancel()
            with contextlib.suppress(asyncio.CancelledError, asyncpg.PostgresError):
                await writing
        await consumer.stop()
        await connection.close()
    if first_at is None:  # nothing expected
        first_at = finished
    # The peer's process (the meter's "bench" group) is the "worker" of this measurement.
    cores.pop("worker", None)  # the meter's own worker group: no processes
    if "bench" in cores:
        cores["worker"] = cores.pop("bench")
    measured = finished - first_at
    return RateResult(
        messages=count,
        events_per_second=(count - first_count) / measured if measured > 0 else float("nan"),
        events_per_second_with_startup=count / (finished - started),
        startup_seconds=first_at - started,
        measured_seconds=measured,
        extra={
            "first_progress_messages": first_count,
            "batches": batches,
            "mean_batch": round(count / batches) if batches else None,
            "rows_per_batch": round(devices_written / batches) if batches else None,
            "cores_used": cores,
        },
    )


async def measure_peer(
    services: Services,
    scenario: Scenario,
    expected: int,
    limit_seconds: float,
    log_path: Path,
) -> tuple[RateResult, float]:
    """Runs the peer as a subprocess until it has stored `expected` messages from where its
    group stands; returns its result and its peak RSS in MB."""
    arguments = {
        "kafka_bootstrap_servers": services.kafka_bootstrap_servers,
        "database_url": scenario.database_url,
        "group": scenario.peer_group,
        "topics": scenario.topics,
        "expected": expected,
        "limit_seconds": limit_seconds,
    }
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "scripts.bench.peer",
            json.dumps(arguments),
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stdout=asyncio.subprocess.PIPE,
            stderr=log_file,
        )
        sampler = RssSampler(process.pid)
        sampler.start()
        try:
            output, _ = await asyncio.wait_for(process.communicate(), limit_seconds + 60)
        finally:
            sampler.stop()
    if process.returncode != 0:
        raise RuntimeError(f"the peer exited with {process.returncode}; see {log_path}")
    lines = output.decode().strip().splitlines()
    result = RateResult(**json.loads(lines[-1]))
    return result, sampler.peak_bytes / 1_048_576


def main() -> None:
    arguments = json.loads(sys.argv[1])
    import_worker_modules(CODE_DIR)
    UnderTest.configure_logging("warning", "console")
    result = asyncio.run(drain(arguments))
    log(f"peer: {result.messages:,} messages, {result.events_per_second:,.0f} ev/s")
    print(json.dumps(asdict(result)), flush=True)


if __name__ == "__main__":
    main()

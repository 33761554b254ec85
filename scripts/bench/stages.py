"""The stage limits, against which the worker's drain is read: (a) what a bare consumer reads,
(a2) that plus the worker's decoding and folding, (a3) the worker's write path alone, and
(a4) the CPU ceiling those two stages' costs per event imply."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from scripts.bench.code_under_test import UnderTest
from scripts.bench.meters import CpuMeter
from scripts.bench.scenario import Scenario, Services, create_database, drop_database
from scripts.bench.shapes import Workload


@dataclass
class RateResult:
    messages: int
    # Steady rate: from the first batch received / first progress stored to the end,
    # over the messages after that first batch. This is the figure compared with targets.
    events_per_second: float
    # Including start-up (consumer start and group join; for the worker also process start,
    # imports and the database pool).
    events_per_second_with_startup: float
    startup_seconds: float
    measured_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


async def measure_read_limit(
    settings: Any,
    total: int,
    limit_seconds: float,
    process: Callable[[Mapping[Any, Any]], object] | None = None,
    services: Services | None = None,
) -> RateResult:
    """(a) Reads every message from a fresh group and, with `process`, hands each fetched
    batch to it before fetching the next (the decode limit, (a2)). With `services`, the CPU
    used from the first batch on is measured too."""
    meter = CpuMeter([], services) if services is not None else None
    consumer = UnderTest.create_consumer(settings)
    consumer.subscribe(list(settings.agent_topics))
    started = time.perf_counter()
    await consumer.start()
    count = 0
    first_at: float | None = None
    first_count = 0
    batches = 0
    deadline = started + limit_seconds
    try:
        while count < total:
            if time.perf_counter() > deadline:
                raise TimeoutError(
                    f"read only {count} of {total} messages in {limit_seconds:.0f} s"
                )
            records = await consumer.getmany(
                timeout_ms=settings.batch_max_wait_ms, max_records=settings.batch_max_records
            )
            received = sum(len(batch) for batch in records.values())
            if not received:
                continue
            batches += 1
            if process is not None:
                process(records)
            if first_at is None:
                first_at, first_count = time.perf_counter(), received
                if meter is not None:
                    meter.start()
            count += received
        finished = time.perf_counter()
        cores = meter.stop() if meter is not None else None
    finally:
        await consumer.stop()
    assert first_at is not None
    measured = finished - first_at
    return RateResult(
        messages=count,
        events_per_second=(count - first_count) / measured if measured > 0 else float("nan"),
        events_per_second_with_startup=count / (finished - started),
        startup_seconds=first_at - started,
        measured_seconds=measured,
        extra={"batches": batches, "mean_batch": count / batches}
        | ({"cores_used": cores} if cores else {}),
    )


def decode_and_fold(settings: Any) -> Callable[[Mapping[Any, Any]], tuple[Any, Any]]:
    """What the worker does to a fetched batch before writing it (`IngestionLoop._decode`,
    without its turns of the event loop): decode and validate every message, then fold."""

    def process(records: Mapping[Any, Any]) -> tuple[Any, Any]:
        batch = UnderTest.decode_batch(records, settings.max_message_bytes)
        events = (item.event for item in batch.good)
        return batch, UnderTest.coalesce(events, datetime.now(UTC), settings.future_tolerance)

    return process


STAGE_LABELS = {
    "decode": "(a2) read + decode + fold limit (no database)",
    "write": "(a3) write limit (write path alone, no Kafka)",
    "cpu_ceiling": "(a4) CPU ceiling: all cores / CPU per event of (a2) + (a3)",
}


def stage_rates(run: dict[str, Any]) -> dict[str, float]:
    """A run's stage limits in ev/s, by the keys of STAGE_LABELS; empty with --skip-stages."""
    if "decode" not in run:
        return {}
    return {
        "decode": run["decode"]["events_per_second"],
        "write": run["write"]["events_per_second"],
        "cpu_ceiling": run["cpu_ceiling_events_per_second"],
    }


def cpu_ceiling(decode: RateResult, write: RateResult) -> float:
    """(a4) The rate at which the CPU that (a2) and (a3) spend per event would fill every
    core of the machine: decoding (this process and the broker serving it) plus writing (this
    process and Postgres), overlapped perfectly, with nothing else running. The worker also
    runs its outbox relay and commits offsets, so at these costs it cannot drain faster."""
    decode_cores, write_cores = decode.extra["cores_used"], write.extra["cores_used"]
    per_event: float = (
        decode_cores["bench"] + decode_cores.get("kafka", 0.0)
    ) / decode.events_per_second
    per_event += (write_cores["bench"] + write_cores.get("postgres", 0.0)) / write.events_per_second
    return float(decode_cores["machine_cores"]) / per_event


@contextlib.contextmanager
def worker_gc_settings() -> Iterator[None]:
    """This process collects garbage as the worker does (`tune_garbage_collection`'s
    thresholds) while it stands in for the worker's Python."""
    previous = gc.get_threshold()
    if UnderTest.gc_thresholds:
        gc.set_threshold(*UnderTest.gc_thresholds)
    try:
        yield
    finally:
        gc.set_threshold(*previous)


async def measure_decode_limit(
    services: Services, scenario: Scenario, total: int, limit_seconds: float
) -> RateResult:
    """(a2) The read limit plus the worker's decoding and folding of every batch, in this
    process: what one worker's Python can do before any database work."""
    settings = scenario.worker_settings(services, scenario.stage_groups[0])
    with worker_gc_settings():
        return await measure_read_limit(
            settings, total, limit_seconds, decode_and_fold(settings), services
        )


async def measure_write_limit(
    services: Services, scenario: Scenario, workload: Workload, limit_seconds: float
) -> RateResult:
    """(a3) The worker's write path alone: every batch is fetched, decoded and folded first
    (not timed), then written into a fresh database back to back by the worker's own
    `IngestionLoop._store` (the concurrent parts, the license decisions, the progress), as
    the worker writes them one after the other. No Kafka, no decoding, no outbox relay."""
    reader = scenario.worker_settings(services, scenario.stage_groups[1])
    fold = decode_and_fold(reader)
    prepared: list[tuple[Any, Any]] = []

    def keep(records: Mapping[Any, Any]) -> None:
        batch, changes = fold(records)
        # A batch that Postgres accepts whole needs only its progress to be written.
        prepared.append((type(batch)(progress=batch.progress), changes))

    await measure_read_limit(reader, workload.total, limit_seconds, keep)
    name, url = await create_database(services, f"license_bench_write_{scenario.suffix}")
    try:
        settings = UnderTest.Settings(
            kafka_bootstrap_servers=services.kafka_bootstrap_servers,
            database_url=url,
            consumer_group=scenario.stage_groups[1],
            unknown_customers="admit",
            **scenario.topics,
        )
        repository = await UnderTest.Repository.connect(url, settings.database_pool_size)
        try:
            loop = UnderTest.IngestionLoop(
                settings=settings,
                consumer=None,
                producer=None,
                repository=repository,
                clock=UnderTest.SystemClock(),
                stopping=asyncio.Event(),
            )
            meter = CpuMeter([], services)
            meter.start()
            started = time.perf_counter()
            with worker_gc_settings():
                for batch, changes in prepared:
                    await loop._store(batch, changes)  # one batch's write, as the worker does
            elapsed = time.perf_counter() - started
            cores = meter.stop()
        finally:
            await repository.close()
        connection = await asyncpg.connect(url)
        try:
            devices = await connection.fetchval("SELECT count(*) FROM devices")
        finally:
            await connection.close()
    finally:
        await drop_database(services, name)
    if devices != workload.devices:
        raise RuntimeError(f"write limit stored {devices} devices, not {workload.devices}")
    return RateResult(
        messages=workload.total,
        events_per_second=workload.total / elapsed,
        events_per_second_with_startup=workload.total / elapsed,
        startup_seconds=0.0,
        measured_seconds=elapsed,
        # `bench` is this process, i.e. the write path's Python.
        extra={"batches": len(prepared), "cores_used": cores},
    )

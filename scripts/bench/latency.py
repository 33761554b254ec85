"""(d) Latency: the worker on fresh topics while a producer sends a live fleet's heartbeats at
a fixed rate; each message's latency is the time its offset was seen committed (or stored)
minus the time it was handed to the producer."""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from scripts.bench.code_under_test import UnderTest
from scripts.bench.meters import CpuMeter
from scripts.bench.scenario import Scenario, Services, bulk_producer
from scripts.bench.shapes import HEARTBEAT_INTERVAL
from scripts.bench.workers import ProgressWatch, WorkerProcess, scrape_batch_metrics

LATENCY_POLL_SECONDS = 0.01  # latency: how often progress and committed offsets are read


@dataclass
class LatencyResult:
    target_rate: float
    achieved_rate: float
    messages: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    # Same figures with "stored in Postgres" (ingestion_progress) as the end point.
    stored_p50_ms: float
    stored_p99_ms: float
    peak_rss_mb: float
    cores_used: dict[str, float]
    # From the worker's histograms, over the fixed-rate phase only.
    worker_batches: float | None
    mean_batch: float | None
    mean_write_ms: float | None


class OffsetTimeline:
    """Per partition, the times at which the committed offset was seen to advance."""

    def __init__(self) -> None:
        self.times: dict[tuple[str, int], list[float]] = {}
        self.offsets: dict[tuple[str, int], list[int]] = {}

    def observe(self, at: float, offsets: dict[tuple[str, int], int]) -> None:
        for partition, offset in offsets.items():
            known = self.offsets.setdefault(partition, [])
            if not known or offset > known[-1]:
                known.append(offset)
                self.times.setdefault(partition, []).append(at)

    def time_of(self, partition: tuple[str, int], offset: int) -> float | None:
        """When the message at `offset` was first seen covered (next offset > offset)."""
        known = self.offsets.get(partition, [])
        index = bisect.bisect_right(known, offset)
        return self.times[partition][index] if index < len(known) else None

    def total(self) -> int:
        return sum(known[-1] for known in self.offsets.values() if known)


async def poll_into(timeline: OffsetTimeline, read: Any, stop: asyncio.Event) -> int:
    polls = 0
    while not stop.is_set():
        offsets = await read()
        # The response time: the commit happened at or before it (a conservative bound,
        # at most one poll interval plus the query's own time late).
        at = time.perf_counter()
        if offsets:
            timeline.observe(at, offsets)
        polls += 1
        await asyncio.sleep(LATENCY_POLL_SECONDS)
    return polls


async def wait_for(condition: Any, limit_seconds: float, what: str, worker: WorkerProcess) -> None:
    deadline = time.perf_counter() + limit_seconds
    while not await condition():
        worker.check_alive()
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{what} did not happen within {limit_seconds:.0f} s")
        await asyncio.sleep(0.05)


async def measure_latency(
    services: Services,
    scenario: Scenario,
    fleet: list[Any],
    rate: float,
    seconds: float,
    log_path: Path,
) -> LatencyResult:
    """A live fleet already known to the database heartbeats at `rate` events/s."""
    now = datetime.now(UTC).replace(microsecond=0)
    lifecycle_topic = scenario.topics["lifecycle_topic"]
    heartbeat_topic = scenario.topics["heartbeat_topic"]
    count = int(rate * seconds)
    rounds = -(-count // len(fleet))
    start = now - HEARTBEAT_INTERVAL * (rounds + 1)
    # Built before the clock starts; the send time is added when the message is sent.
    # Each device's partition as the default partitioner (murmur2 of the key) picks it, so a
    # device's heartbeats stay in order in one partition, as the agents' would.
    partitioner = DefaultPartitioner()
    all_partitions = list(range(scenario.partitions))
    partition_of = {
        device.key: partitioner(device.key, all_partitions, all_partitions) for device in fleet
    }
    events = [
        (device.key, partition_of[device.key], UnderTest.agent_event(device, "heartbeat", at))
        for device, at in UnderTest.heartbeat_rounds(fleet, rounds, start, HEARTBEAT_INTERVAL)
    ][:count]

    stored = OffsetTimeline()
    committed = OffsetTimeline()
    async with ProgressWatch(services, scenario) as watch:
        worker = WorkerProcess(scenario.worker_environment(services), log_path, None).start()
        try:
            # Warm-up: the fleet's installs, drained and committed before the clock starts.
            producer = bulk_producer(services.kafka_bootstrap_servers)
            await producer.start()
            try:
                for device in fleet:
                    event = UnderTest.agent_event(device, "install", start - timedelta(minutes=1))
                    await producer.send(lifecycle_topic, UnderTest.encode(event), key=device.key)
                await producer.flush()
            finally:
                await producer.stop()

            async def warmed_up() -> bool:
                offsets = await watch.committed()
                return offsets is not None and sum(offsets.values()) >= len(fleet)

            await wait_for(warmed_up, 180, "the warm-up drain", worker)
            base_committed = await watch.committed() or {}
            before = await asyncio.to_thread(scrape_batch_metrics, worker.metrics_port)
            stored.observe(time.perf_counter(), await watch.stored())
            committed.observe(time.perf_counter(), base_committed)

            stop_polling = asyncio.Event()
            pollers = [
                asyncio.create_task(poll_into(stored, watch.stored, stop_polling)),
                asyncio.create_task(poll_into(committed, watch.committed, stop_polling)),
            ]
            # The latency producer (acks=all), paced to the fixed rate in 5 ms ticks: each tick
            # sends the messages due by then as one record batch per partition (what a 5 ms
            # linger would do), which keeps this process's CPU use low on a 2-core machine.
            producer = AIOKafkaProducer(
                bootstrap_servers=services.kafka_bootstrap_servers, acks="all", linger_ms=0
            )
            await producer.start()
            cpu = CpuMeter([worker.process.pid], services)  # type: ignore[union-attr]
            cpu.start()
            # Per record batch: its future, the send time, how many messages it holds.
            sent: list[tuple[asyncio.Future[Any], float, int]] = []
            try:
                began = time.perf_counter()
                index = 0
                while index < count:
                    due = min(count, int((time.perf_counter() - began) * rate) + 1)
                    batches: dict[int, Any] = {}
                    sizes: dict[int, int] = {}
                    stamp = time.time_ns()
                    while index < due:
                        key, partition, event = events[index]
                        event["bench_sent_at_ns"] = stamp  # an unknown field: ignored
                        batch = batches.get(partition)
                        if batch is None:
                            batch = batches[partition] = producer.create_batch()
                        if batch.append(key=key, value=orjson.dumps(event), timestamp=None) is None:
                            break  # batch full: the rest goes in the next tick
                        sizes[partition] = sizes.get(partition, 0) + 1
                        index += 1
                    sent_at = time.perf_counter()
                    for partition, batch in batches.items():
                        if sizes.get(partition):
                            batch.close()
                            future = await producer.send_batch(
                                batch, heartbeat_topic, partition=partition
                            )
                            sent.append((future, sent_at, sizes[partition]))
                    await asyncio.sleep(0.005)
                send_seconds = time.perf_counter() - began
                metadata = await asyncio.gather(*(future for future, _, _ in sent))
            finally:
                await producer.stop()

            expected = sum(base_committed.values()) + count

            async def drained() -> bool:
                return committed.total() >= expected

            await wait_for(drained, 120, "the latency run's drain", worker)
            cores = cpu.stop()
            after = await asyncio.to_thread(scrape_batch_metrics, worker.metrics_port)
            stop_polling.set()
            await asyncio.gather(*pollers)
        finally:
            worker.stop()

    latencies, stored_latencies = [], []
    for meta, (_, sent_at, size) in zip(metadata, sent, strict=True):
        partition = (meta.topic, meta.partition)
        for offset in range(meta.offset, meta.offset + size):
            committed_at = committed.time_of(partition, offset)
            stored_at = stored.time_of(partition, offset)
            if committed_at is None or stored_at is None:
                raise RuntimeError(f"offset {offset} of {partition} was never seen committed")
            latencies.append((committed_at - sent_at) * 1000)
            stored_latencies.append((stored_at - sent_at) * 1000)
    return LatencyResult(
        target_rate=rate,
        achieved_rate=count / send_seconds,
        messages=count,
        p50_ms=percentile(latencies, 50),
        p90_ms=percentile(latencies, 90),
        p99_ms=percentile(latencies, 99),
        max_ms=max(latencies),
        stored_p50_ms=percentile(stored_latencies, 50),
        stored_p99_ms=percentile(stored_latencies, 99),
        peak_rss_mb=worker.peak_rss_mb,
        cores_used=cores,
        **batch_statistics(before, after),
    )


def batch_statistics(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    keys = ("batches", "messages", "write_seconds")
    if not all(key in before and key in after for key in keys):
        return {"worker_batches": None, "mean_batch": None, "mean_write_ms": None}
    batches, messages, seconds = (after[key] - before[key] for key in keys)
    return {
        "worker_batches": batches,
        "mean_batch": round(messages / batches, 1) if batches else None,
        "mean_write_ms": round(seconds / batches * 1000, 1) if batches else None,
    }


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)

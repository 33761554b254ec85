#!/usr/bin/env python
"""Ingestion benchmark against the real broker and database (see docs/benchmarks.md).

    .venv/bin/python scripts/bench.py [--runs 3] [--quick]

Needs KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL (`bash scripts/bench.sh` starts local services
when they are not set). Every run uses fresh topics, a fresh consumer group and a fresh,
migrated database, and removes them afterwards.

The code under test is copied once at start (worker/, schemas/, sql/ of the working tree, or
of `--git-ref REF`) to .local/bench-code, so every run measures the same code even while the
working tree changes; the commit and any uncommitted changes are recorded in the JSON.

Per fleet shape ("live", "backlog") and run:
  1. produce the shape's installs, heartbeats and a few uninstalls into fresh topics;
  2. (a) read limit: a bare aiokafka consumer (built by `worker.kafka_clients.create_consumer`,
     so the same fetch settings, and `getmany` with the worker's `batch_max_records`) reads
     every message from a fresh group, without decoding them;
     (a2) the same, plus the worker's own decoding and folding of each batch (no database);
     (a3) the worker's write path alone (`IngestionLoop._store` on pre-folded batches, into
     a fresh database; no Kafka); (a4) the CPU ceiling: the machine's cores divided by the
     CPU one event costs in (a2) and (a3), broker and Postgres included (`--skip-stages`
     skips a2-a4);
  3. (b) drain: the real worker (`python -m worker.cli run`, a subprocess) consumes the same
     pre-filled topics into Postgres; the rate is measured from the first progress the worker
     stored to the moment every offset is committed in Kafka (start-up excluded; the rate with
     start-up included is reported too);
  4. (c) ratio (b)/(a).
Then (d) latency: the worker runs on fresh topics while a producer sends a live fleet's
heartbeats at a fixed rate (half the median live drain rate) for --latency-seconds; each
message's latency is the time its offset was seen committed minus the time it was handed to
the producer. (e) The worker's peak RSS (process and children, sampled every 100 ms) over
every phase.

Results: a table on stdout and a JSON file (default .local/bench-results.json); worker logs
in .local/bench-logs. `--profile DIR` runs the drain workers under cProfile (or pyinstrument).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import gc
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

REPO_ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT_PATHS = ("worker", "schemas", "sql")
# BENCH_WORK_DIR moves the snapshot and the logs (the tests run the script in a directory of
# their own, so they never disturb a benchmark in progress).
WORK_DIR = Path(os.environ.get("BENCH_WORK_DIR", REPO_ROOT / ".local"))
CODE_DIR = WORK_DIR / "bench-code"  # the snapshot of the code under test
LOG_DIR = WORK_DIR / "bench-logs"  # one worker log per run

# Imported from the snapshot of the code under test by `import_worker_modules()`, so the
# benchmark's reader, settings and simulated fleet match the worker it starts.
Settings: Any = None
create_consumer: Any = None
configure_logging: Any = None
agent_event: Any = None
build_fleet: Any = None
device_bursts: Any = None
encode: Any = None
heartbeat_rounds: Any = None
# For the stage limits (a2) and (a3): the worker's own decoding, folding and write path.
decode_batch: Any = None
coalesce: Any = None
IngestionLoop: Any = None
Repository: Any = None
SystemClock: Any = None
WORKER_GC_THRESHOLDS: tuple[int, ...] | None = None


def snapshot_code(destination: Path, git_ref: str | None) -> dict[str, Any]:
    """Copies the worker's code (the working tree, or a git ref) to `destination`: every run
    then measures the same code even while the working tree is being edited."""
    if destination.exists():
        shutil.rmtree(destination)
    destination.mkdir(parents=True)
    if git_ref:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", git_ref, *SNAPSHOT_PATHS],
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(destination)], input=archive, check=True)
    else:
        for name in SNAPSHOT_PATHS:
            shutil.copytree(
                REPO_ROOT / name,
                destination / name,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            )

    def git(*arguments: str) -> str:
        result = subprocess.run(
            ["git", *arguments], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )
        return result.stdout.strip()

    return {
        "source": f"git {git_ref}" if git_ref else "working tree",
        "commit": git("rev-parse", git_ref or "HEAD"),
        "uncommitted_changes": []
        if git_ref
        else git("status", "--porcelain", "--", *SNAPSHOT_PATHS).splitlines(),
        "snapshot_dir": str(destination),
    }


def import_worker_modules(snapshot: Path) -> None:
    global Settings, create_consumer, configure_logging  # noqa: PLW0603
    global agent_event, build_fleet, device_bursts, encode, heartbeat_rounds  # noqa: PLW0603
    global decode_batch, coalesce, IngestionLoop, Repository, SystemClock  # noqa: PLW0603
    global WORKER_GC_THRESHOLDS  # noqa: PLW0603
    sys.path.insert(0, str(snapshot))
    from worker import (  # noqa: PLC0415
        batch,
        clock,
        ingest,
        kafka_clients,
        logs,
        repository,
        service,
        settings,
        simulator,
    )
    from worker import coalesce as folding  # noqa: PLC0415

    Settings = settings.Settings
    create_consumer = kafka_clients.create_consumer
    configure_logging = logs.configure_logging
    agent_event, build_fleet = simulator.agent_event, simulator.build_fleet
    device_bursts, encode = simulator.device_bursts, simulator.encode
    heartbeat_rounds = simulator.heartbeat_rounds
    decode_batch, coalesce = batch.decode_batch, folding.coalesce
    IngestionLoop, Repository = ingest.IngestionLoop, repository.Repository
    SystemClock = clock.SystemClock
    young = getattr(service, "YOUNG_COLLECTION_THRESHOLD", None)
    older = getattr(service, "OLDER_COLLECTION_THRESHOLDS", None)
    WORKER_GC_THRESHOLDS = (young, *older) if young and older else None
    loaded_from = Path(sys.modules["worker"].__file__ or "").resolve()
    if snapshot.resolve() not in loaded_from.parents:
        raise RuntimeError(f"worker modules came from {loaded_from}, not from {snapshot}")


TARGETS = {
    "live_events_per_second": 20_000,
    "backlog_events_per_second": 80_000,
    "latency_p99_ms": 250,
    "peak_rss_mb": 256,
}
HEARTBEAT_INTERVAL = timedelta(minutes=5)
PROGRESS_POLL_SECONDS = 0.02  # drain: how often ingestion_progress is read
LATENCY_POLL_SECONDS = 0.01  # latency: how often progress and committed offsets are read
RSS_SAMPLE_SECONDS = 0.1


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Shape:
    name: str
    customers: int
    devices_per_customer: int
    heartbeats_per_device: int
    # "rounds": every device once per round (a live fleet); "bursts": each device's
    # heartbeats back to back (a backlog replay after an outage).
    order: str
    uninstall_every: int = 100  # every Nth device sends an uninstall at the end
    seed: int = 0

    @property
    def devices(self) -> int:
        return self.customers * self.devices_per_customer

    def describe(self) -> str:
        order = "round-robin rounds" if self.order == "rounds" else "per-device bursts"
        return (
            f"{self.devices:,} devices ({self.customers} customers), 1 install + "
            f"{self.heartbeats_per_device} heartbeats each ({order}), "
            f"1 uninstall per {self.uninstall_every} devices"
        )


@dataclass
class Workload:
    shape: Shape
    lifecycle: list[tuple[bytes, bytes]]
    heartbeats: list[tuple[bytes, bytes]]
    devices: int
    lifecycle_events: int

    @property
    def total(self) -> int:
        return len(self.lifecycle) + len(self.heartbeats)


def build_workload(shape: Shape, now: datetime) -> Workload:
    """Pre-encodes every message, so producing is not limited by building events."""
    fleet = build_fleet(shape.customers, shape.devices_per_customer, seed=shape.seed)
    start = now - HEARTBEAT_INTERVAL * (shape.heartbeats_per_device + 2)
    installed_at = start - timedelta(minutes=1)
    lifecycle = [(d.key, encode(agent_event(d, "install", installed_at))) for d in fleet]
    generator = heartbeat_rounds if shape.order == "rounds" else device_bursts
    heartbeats = [
        (d.key, encode(agent_event(d, "heartbeat", at)))
        for d, at in generator(fleet, shape.heartbeats_per_device, start, HEARTBEAT_INTERVAL)
    ]
    uninstalled_at = start + HEARTBEAT_INTERVAL * shape.heartbeats_per_device
    lifecycle += [
        (d.key, encode(agent_event(d, "uninstall", uninstalled_at)))
        for d in fleet[shape.uninstall_every - 1 :: shape.uninstall_every]
    ]
    return Workload(shape, lifecycle, heartbeats, len(fleet), len(lifecycle))


def full_shapes() -> dict[str, Shape]:
    return {
        "live": Shape("live", 50, 1_000, 7, "rounds", seed=1),
        "backlog": Shape("backlog", 20, 1_000, 15, "bursts", seed=2),
    }


def quick_shapes() -> dict[str, Shape]:
    return {
        "live": Shape("live", 4, 500, 3, "rounds", seed=1),
        "backlog": Shape("backlog", 2, 250, 12, "bursts", seed=2),
    }


# ------------------------------------------------------------------------ environment


@dataclass(frozen=True)
class Services:
    kafka_bootstrap_servers: str
    database_url: str

    def database_url_for(self, name: str) -> str:
        parts = urlsplit(self.database_url)
        return urlunsplit(parts._replace(path=f"/{name}"))


@dataclass
class Scenario:
    """Fresh topics, group and database for one measurement."""

    suffix: str
    partitions: int
    database_name: str
    database_url: str
    topics: dict[str, str]

    @property
    def agent_topics(self) -> tuple[str, str]:
        return (self.topics["heartbeat_topic"], self.topics["lifecycle_topic"])

    def worker_settings(self, services: Services, group: str) -> Settings:
        # The environment (e.g. BATCH_MAX_RECORDS) still applies to what is not set here,
        # exactly as it does for the worker subprocess.
        return Settings(
            kafka_bootstrap_servers=services.kafka_bootstrap_servers,
            database_url=self.database_url,
            consumer_group=group,
            **self.topics,
        )

    def worker_environment(self, services: Services) -> dict[str, str]:
        environment = dict(os.environ)
        environment.update(
            {
                "KAFKA_BOOTSTRAP_SERVERS": services.kafka_bootstrap_servers,
                "DATABASE_URL": self.database_url,
                "CONSUMER_GROUP": self.worker_group,
                "LOG_FORMAT": "json",
                "LOG_LEVEL": environment.get("LOG_LEVEL", "info"),
                "METRICS_PORT": str(free_port()),
                "PYTHONPATH": os.pathsep.join(
                    [str(CODE_DIR), *filter(None, [environment.get("PYTHONPATH")])]
                ),
                **{name.upper(): value for name, value in self.topics.items()},
            }
        )
        return environment

    @property
    def worker_group(self) -> str:
        return f"bench-worker-{self.suffix}"

    @property
    def reader_group(self) -> str:
        return f"bench-reader-{self.suffix}"

    @property
    def stage_groups(self) -> tuple[str, str]:
        """The groups that read for the decode limit (a2) and the write limit (a3)."""
        return (f"bench-decode-{self.suffix}", f"bench-write-{self.suffix}")


async def create_scenario(services: Services, partitions: int) -> Scenario:
    suffix = uuid.uuid4().hex[:10]
    topics = {
        "heartbeat_topic": f"bench.heartbeat.{suffix}",
        "lifecycle_topic": f"bench.lifecycle.{suffix}",
        "dlq_topic": f"bench.dlq.{suffix}",
        "license_events_topic": f"bench.license-events.{suffix}",
    }
    admin = AIOKafkaAdminClient(bootstrap_servers=services.kafka_bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(name, num_partitions=partitions, replication_factor=1)
                for name in topics.values()
            ]
        )
    finally:
        await admin.close()
    name, url = await create_database(services, f"license_bench_{suffix}")
    return Scenario(suffix, partitions, name, url, topics)


async def create_database(services: Services, name: str) -> tuple[str, str]:
    """A fresh database, migrated by the worker's own `migrate` command."""
    connection = await asyncpg.connect(services.database_url_for("postgres"))
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    url = services.database_url_for(name)
    # The worker's own `migrate` command, from the snapshot under test.
    environment = {
        **os.environ,
        "DATABASE_URL": url,
        "LOG_FORMAT": "json",
        "PYTHONPATH": str(CODE_DIR),
    }
    migrate = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.cli",
        "migrate",
        cwd=CODE_DIR,
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await migrate.communicate()
    if migrate.returncode != 0:
        raise RuntimeError(f"migrate failed:\n{output.decode(errors='replace')}")
    return name, url


async def drop_database(services: Services, name: str) -> None:
    connection = await asyncpg.connect(services.database_url_for("postgres"))
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


async def drop_scenario(services: Services, scenario: Scenario) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=services.kafka_bootstrap_servers)
    await admin.start()
    try:
        await admin.delete_topics(list(scenario.topics.values()))
        with contextlib.suppress(KafkaError, AttributeError):
            await admin.delete_consumer_groups(
                [scenario.worker_group, scenario.reader_group, *scenario.stage_groups]
            )
    except KafkaError as error:
        log(f"could not delete topics of {scenario.suffix}: {error!r}")
    finally:
        await admin.close()
    await drop_database(services, scenario.database_name)


# -------------------------------------------------------------------------- producing


def bulk_producer(bootstrap: str) -> AIOKafkaProducer:
    # Default 16 KiB batches with a short linger: a few dozen messages per record batch,
    # as a broker sees them from many agents through a gateway. Not tuned for speed.
    return AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=10)


async def produce_workload(services: Services, scenario: Scenario, workload: Workload) -> float:
    producer = bulk_producer(services.kafka_bootstrap_servers)
    await producer.start()
    started = time.perf_counter()
    try:
        lifecycle_topic = scenario.topics["lifecycle_topic"]
        heartbeat_topic = scenario.topics["heartbeat_topic"]
        for key, value in workload.lifecycle:
            await producer.send(lifecycle_topic, value, key=key)
        for key, value in workload.heartbeats:
            await producer.send(heartbeat_topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()
    elapsed = time.perf_counter() - started
    ends = await end_offsets(services, scenario)
    if sum(ends.values()) != workload.total:
        raise RuntimeError(
            f"produced {workload.total} messages but the topics hold {sum(ends.values())}"
        )
    return elapsed


async def end_offsets(services: Services, scenario: Scenario) -> dict[tuple[str, int], int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=services.kafka_bootstrap_servers)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(
            [
                TopicPartition(topic, partition)
                for topic in scenario.agent_topics
                for partition in range(scenario.partitions)
            ]
        )
    finally:
        await consumer.stop()
    return {(tp.topic, tp.partition): offset for tp, offset in ends.items()}


# ---------------------------------------------------------------------- (a) read limit


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
    settings: Settings,
    total: int,
    limit_seconds: float,
    process: Callable[[Mapping[Any, Any]], object] | None = None,
    services: Services | None = None,
) -> RateResult:
    """(a) Reads every message from a fresh group and, with `process`, hands each fetched
    batch to it before fetching the next (the decode limit, (a2)). With `services`, the CPU
    used from the first batch on is measured too."""
    meter = CpuMeter([], services) if services is not None else None
    consumer = create_consumer(settings)
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


# ------------------------------------------------------------------ stage limits (a2), (a3)


def decode_and_fold(settings: Settings) -> Callable[[Mapping[Any, Any]], tuple[Any, Any]]:
    """What the worker does to a fetched batch before writing it (`IngestionLoop._decode`,
    without its turns of the event loop): decode and validate every message, then fold."""

    def process(records: Mapping[Any, Any]) -> tuple[Any, Any]:
        batch = decode_batch(records, settings.max_message_bytes)
        events = (item.event for item in batch.good)
        return batch, coalesce(events, datetime.now(UTC), settings.future_tolerance)

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
    per_event = (decode_cores["bench"] + decode_cores.get("kafka", 0.0)) / decode.events_per_second
    per_event += (write_cores["bench"] + write_cores.get("postgres", 0.0)) / write.events_per_second
    return float(decode_cores["machine_cores"]) / per_event


@contextlib.contextmanager
def worker_gc_settings() -> Iterator[None]:
    """This process collects garbage as the worker does (`tune_garbage_collection`'s
    thresholds) while it stands in for the worker's Python."""
    previous = gc.get_threshold()
    if WORKER_GC_THRESHOLDS:
        gc.set_threshold(*WORKER_GC_THRESHOLDS)
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
        settings = Settings(
            kafka_bootstrap_servers=services.kafka_bootstrap_servers,
            database_url=url,
            consumer_group=scenario.stage_groups[1],
            **scenario.topics,
        )
        repository = await Repository.connect(url, settings.database_pool_size)
        try:
            loop = IngestionLoop(
                settings=settings,
                consumer=None,
                producer=None,
                repository=repository,
                clock=SystemClock(),
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


# ---------------------------------------------------------------------- the worker process


class RssSampler(threading.Thread):
    """Samples the RSS of a process and all its children every 100 ms (the list of children
    is refreshed every second: finding them scans /proc, which costs more than sampling)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self._process = psutil.Process(pid)
        self._stop_event = threading.Event()
        self.peak_bytes = 0
        self.samples = 0

    def run(self) -> None:
        children: list[psutil.Process] = []
        while not self._stop_event.is_set():
            if self.samples % 10 == 0:
                with contextlib.suppress(psutil.Error):
                    children = self._process.children(recursive=True)
            try:
                rss = self._process.memory_info().rss
            except psutil.Error:
                return
            for child in children:
                with contextlib.suppress(psutil.Error):
                    rss += child.memory_info().rss
            self.peak_bytes = max(self.peak_bytes, rss)
            self.samples += 1
            self._stop_event.wait(RSS_SAMPLE_SECONDS)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


class CpuMeter:
    """CPU seconds of the worker, the broker, the Postgres server and the whole machine."""

    def __init__(self, worker_pids: list[int], services: Services) -> None:
        self._groups: dict[str, list[psutil.Process]] = {
            "worker": [psutil.Process(pid) for pid in worker_pids],
            "bench": [psutil.Process(os.getpid())],  # this script: producer and pollers
        }
        for name, port in (
            ("kafka", _port(services.kafka_bootstrap_servers)),
            ("postgres", urlsplit(services.database_url).port),
        ):
            owner = _listening_process(port) if port else None
            if owner is not None:
                self._groups[name] = [owner]
        self._start: dict[str, float] = {}
        self._machine_start: Any = None
        self._wall_start = 0.0

    def _cpu(self, name: str) -> float:
        total = 0.0
        for root in self._groups[name]:
            try:
                processes = [root] if name == "bench" else [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for process in processes:
                with contextlib.suppress(psutil.Error):
                    times = process.cpu_times()
                    total += times.user + times.system
        return total

    def start(self) -> None:
        self._wall_start = time.perf_counter()
        self._start = {name: self._cpu(name) for name in self._groups}
        self._machine_start = psutil.cpu_times()

    def stop(self) -> dict[str, float]:
        """Cores used on average since start(), per group and for the whole machine.
        (Children that ended in between, e.g. short-lived Postgres backends, are missed.)"""
        wall = time.perf_counter() - self._wall_start
        used = {
            name: round((self._cpu(name) - self._start[name]) / wall, 2) for name in self._groups
        }
        machine = psutil.cpu_times()
        busy = sum(
            getattr(machine, attribute) - getattr(self._machine_start, attribute)
            for attribute in ("user", "nice", "system", "irq", "softirq", "steal")
        )
        used["machine_busy"] = round(busy / wall, 2)
        # Busy CPU not accounted to the groups above: other tenants of a shared machine
        # (and short-lived processes). A large value means a noisy run.
        accounted = sum(used[name] for name in self._groups)
        used["other"] = round(max(0.0, used["machine_busy"] - accounted), 2)
        used["machine_steal"] = round((machine.steal - self._machine_start.steal) / wall, 2)
        used["machine_cores"] = psutil.cpu_count() or 0
        return used


def _port(bootstrap: str) -> int | None:
    first = bootstrap.split(",", 1)[0]
    try:
        return int(first.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


def _listening_process(port: int) -> psutil.Process | None:
    try:
        for connection in psutil.net_connections(kind="tcp"):
            if (
                connection.status == psutil.CONN_LISTEN
                and connection.laddr.port == port
                and connection.pid
            ):
                return psutil.Process(connection.pid)
    except psutil.Error:
        return None
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape_batch_metrics(port: int) -> dict[str, float]:
    """The worker's own batch histograms (best effort: {} if the endpoint or names differ)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    wanted = {
        "license_worker_batch_size_sum": "messages",
        "license_worker_batch_size_count": "batches",
        "license_worker_batch_write_seconds_sum": "write_seconds",
    }
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            found[wanted[name]] = float(value)
    return found


class WorkerProcess:
    def __init__(
        self, environment: dict[str, str], log_path: Path, profile_path: Path | None
    ) -> None:
        self._environment = environment
        self.metrics_port = int(environment["METRICS_PORT"])
        self._log_path = log_path
        self._profile_path = profile_path
        self.process: subprocess.Popen[bytes] | None = None
        self.sampler: RssSampler | None = None
        self.started_at = 0.0

    def start(self) -> WorkerProcess:
        command = [sys.executable]
        if self._profile_path is not None and self._profile_path.suffix == ".pyisession":
            # pyinstrument must be importable: see docs/benchmarks.md (a separate venv on
            # PYTHONPATH, never the project's).
            command += ["-m", "pyinstrument", "-r", "pyisession", "-o", str(self._profile_path)]
        elif self._profile_path is not None:
            command += ["-m", "cProfile", "-o", str(self._profile_path)]
        command += ["-m", "worker.cli", "run"]
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        with self._log_path.open("ab") as log_file:
            self.started_at = time.perf_counter()
            self.process = subprocess.Popen(
                command, env=self._environment, stdout=log_file, stderr=log_file, cwd=CODE_DIR
            )
        self.sampler = RssSampler(self.process.pid)
        self.sampler.start()
        return self

    def check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(
                f"the worker exited with {self.process.returncode}; see {self._log_path}"
            )

    def stop(self) -> int:
        assert self.process is not None
        assert self.sampler is not None
        code = self.process.poll()
        if code is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                log("the worker did not stop within 60 s of SIGTERM; killing it")
                self.process.kill()
                code = self.process.wait(timeout=30)
        self.sampler.stop()
        return code

    @property
    def peak_rss_mb(self) -> float:
        assert self.sampler is not None
        return self.sampler.peak_bytes / 1_048_576

    def error_lines(self) -> list[str]:
        lines = self._log_path.read_text(errors="replace").splitlines()
        return [line for line in lines if '"level": "error"' in line or "Traceback" in line]


class ProgressWatch:
    """Reads what the worker has stored (ingestion_progress, written in the batch's own
    transaction) and what it has committed (the group's offsets in Kafka)."""

    def __init__(self, services: Services, scenario: Scenario) -> None:
        self._services = services
        self._scenario = scenario
        self._connection: asyncpg.Connection | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._coordinator: int | None = None

    async def __aenter__(self) -> ProgressWatch:
        self._connection = await asyncpg.connect(self._scenario.database_url)
        self._admin = AIOKafkaAdminClient(bootstrap_servers=self._services.kafka_bootstrap_servers)
        await self._admin.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()
        if self._admin is not None:
            await self._admin.close()

    async def stored(self) -> dict[tuple[str, int], int]:
        assert self._connection is not None
        rows = await self._connection.fetch(
            "SELECT topic, partition, next_offset FROM ingestion_progress"
        )
        return {(row["topic"], row["partition"]): row["next_offset"] for row in rows}

    async def committed(self) -> dict[tuple[str, int], int] | None:
        assert self._admin is not None
        try:
            if self._coordinator is None:  # looked up once: one request per poll after that
                self._coordinator = await self._admin.find_coordinator(self._scenario.worker_group)
            offsets = await self._admin.list_consumer_group_offsets(
                self._scenario.worker_group, group_coordinator_id=self._coordinator
            )
        except KafkaError:  # coordinator not ready yet
            self._coordinator = None
            return None
        wanted = set(self._scenario.agent_topics)
        return {
            (tp.topic, tp.partition): meta.offset
            for tp, meta in offsets.items()
            if tp.topic in wanted and meta.offset >= 0
        }

    async def fetchval(self, sql: str) -> Any:
        assert self._connection is not None
        return await self._connection.fetchval(sql)


async def measure_drain(
    services: Services,
    scenario: Scenario,
    workload: Workload,
    log_path: Path,
    profile_path: Path | None,
    limit_seconds: float,
    workers: int = 1,
) -> tuple[RateResult, float]:
    """The drain by `workers` worker processes in one consumer group (replicas on this
    machine; 1 by default). Peak RSS is the largest of one process."""
    total = workload.total
    async with ProgressWatch(services, scenario) as watch:
        replicas = [
            WorkerProcess(
                scenario.worker_environment(services),
                log_path if number == 0 else log_path.with_suffix(f".{number}.log"),
                profile_path if number == 0 else None,
            ).start()
            for number in range(workers)
        ]
        worker = replicas[0]
        cpu = CpuMeter([r.process.pid for r in replicas], services)  # type: ignore[union-attr]
        try:
            deadline = worker.started_at + limit_seconds
            first_at: float | None = None
            first_count = 0
            half_at: float | None = None
            half_count = 0
            stored_at: float | None = None
            while True:
                for replica in replicas:
                    replica.check_alive()
                now = time.perf_counter()
                if now > deadline:
                    raise TimeoutError(
                        f"the worker did not drain {total} messages in {limit_seconds:.0f} s"
                    )
                done = sum((await watch.stored()).values())
                seen = time.perf_counter()
                if done and first_at is None:
                    first_at, first_count = seen, done
                    cpu.start()
                if done >= total / 2 and half_at is None:
                    half_at, half_count = seen, done
                if done >= total:
                    stored_at = seen
                    break
                await asyncio.sleep(PROGRESS_POLL_SECONDS)
            # Stored in Postgres; the offset commit to Kafka follows right after.
            while True:
                committed = await watch.committed()
                seen = time.perf_counter()
                if committed is not None and sum(committed.values()) >= total:
                    break
                if seen > deadline:
                    raise TimeoutError("the worker stored everything but did not commit it")
                await asyncio.sleep(0.005)
            finished = seen
            cores = cpu.stop()
            assert first_at is not None
            assert stored_at is not None
            measured = finished - first_at
            batches: dict[str, float] = {}
            for replica in replicas:
                scraped = await asyncio.to_thread(scrape_batch_metrics, replica.metrics_port)
                for name, value in scraped.items():
                    batches[name] = batches.get(name, 0.0) + value
            devices = await watch.fetchval("SELECT count(*) FROM devices")
            lifecycle = await watch.fetchval("SELECT count(*) FROM device_lifecycle_events")
        finally:
            codes = [replica.stop() for replica in replicas]
            code = max(codes, key=abs)
    errors = [line for replica in replicas for line in replica.error_lines()]
    if devices != workload.devices or lifecycle != workload.lifecycle_events:
        raise RuntimeError(
            f"stored {devices} devices / {lifecycle} lifecycle events, expected "
            f"{workload.devices} / {workload.lifecycle_events}"
        )
    result = RateResult(
        messages=total,
        events_per_second=(total - first_count) / measured,
        events_per_second_with_startup=total / (finished - worker.started_at),
        startup_seconds=first_at - worker.started_at,
        measured_seconds=measured,
        extra={
            "first_progress_messages": first_count,
            # The second half of the messages alone: mostly heartbeats of devices already
            # stored (the installs and first signals, which allocate licenses, come early).
            "second_half_events_per_second": (
                (total - half_count) / (finished - half_at)
                if half_at and finished > half_at
                else None
            ),
            "stored_to_committed_ms": round((finished - stored_at) * 1000, 1),
            "cores_used": cores,
            # From the worker's histograms, over its whole life (start-up included): mean
            # batch size, and license_worker_batch_write_seconds as a share of the drain
            # time. That histogram times the worker's `_store`: coalescing plus the one
            # transaction (statement encoding in the worker, Postgres executing them, and
            # the license decisions taken inside it).
            "worker_batches": batches.get("batches"),
            "mean_batch": (
                round(batches["messages"] / batches["batches"]) if batches.get("batches") else None
            ),
            "write_share": (
                round(batches["write_seconds"] / measured, 2)
                if "write_seconds" in batches
                else None
            ),
            "exit_code": code,
            "error_log_lines": len(errors),
        },
    )
    if errors:
        log(f"the worker logged {len(errors)} error line(s), e.g. {errors[0][:300]}")
    return result, max(replica.peak_rss_mb for replica in replicas)


# --------------------------------------------------------------------------- (d) latency


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
        (device.key, partition_of[device.key], agent_event(device, "heartbeat", at))
        for device, at in heartbeat_rounds(fleet, rounds, start, HEARTBEAT_INTERVAL)
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
                    event = agent_event(device, "install", start - timedelta(minutes=1))
                    await producer.send(lifecycle_topic, encode(event), key=device.key)
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


# ------------------------------------------------------------------------------ report


def median(values: Iterable[float]) -> float:
    items = list(values)
    return statistics.median(items) if items else float("nan")


def machine_info(services: Services, postgres_version: str) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    kafka_lib = Path(os.environ.get("KAFKA_LIB_DIR", REPO_ROOT / ".local" / "kafka-lib"))
    kafka_jars = (
        sorted(p.name for p in kafka_lib.glob("kafka_2.13-*.jar")) if kafka_lib.is_dir() else []
    )
    return {
        "cpu_count": psutil.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgres": postgres_version,
        "kafka": kafka_jars[0].removesuffix(".jar") if kafka_jars else "unknown",
        "kafka_bootstrap_servers": services.kafka_bootstrap_servers,
    }


def fmt(value: float, digits: int = 0) -> str:
    if value != value:  # NaN
        return "-"
    return f"{value:,.{digits}f}"


def verdict(value: float, target: float, higher_is_better: bool) -> str:
    if value != value:
        return ""
    ok = value >= target if higher_is_better else value <= target
    return "PASS" if ok else "FAIL"


def print_table(results: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str, str, str]] = []
    for shape in ("live", "backlog"):
        runs = results["shapes"].get(shape, {}).get("runs", [])
        if not runs:
            continue
        reads = [r["read"]["events_per_second"] for r in runs]
        drains = [r["drain"]["events_per_second"] for r in runs]
        walls = [r["drain"]["events_per_second_with_startup"] for r in runs]
        halves = [
            r["drain"]["extra"].get("second_half_events_per_second") or float("nan") for r in runs
        ]
        ratios = [r["ratio"] for r in runs]
        target = TARGETS[f"{shape}_events_per_second"]
        messages = runs[0]["messages"]
        rows.append(
            (
                f"{shape} ({messages:,} msgs): (a) read limit, ev/s",
                "",
                fmt(median(reads)),
                ", ".join(fmt(x) for x in reads),
                "",
            )
        )
        if all(stage_rates(r) for r in runs):
            for stage, label in STAGE_LABELS.items():
                values = [stage_rates(r)[stage] for r in runs]
                rows.append(
                    (
                        f"{shape}: {label}, ev/s",
                        "",
                        fmt(median(values)),
                        ", ".join(fmt(x) for x in values),
                        "",
                    )
                )
        rows += [
            (
                f"{shape}: (b) worker drain, ev/s",
                f">= {target:,}",
                fmt(median(drains)),
                ", ".join(fmt(x) for x in drains),
                verdict(median(drains), target, True),
            ),
            (
                f"{shape}: (b) second half of the messages only, ev/s",
                "",
                fmt(median(halves)),
                ", ".join(fmt(x) for x in halves),
                "",
            ),
            (
                f"{shape}: (b') drain incl. start-up, ev/s",
                "",
                fmt(median(walls)),
                ", ".join(fmt(x) for x in walls),
                "",
            ),
            (
                f"{shape}: (c) drain / read limit",
                "",
                fmt(median(ratios), 2),
                ", ".join(fmt(x, 2) for x in ratios),
                "",
            ),
        ]
    latency = results.get("latency", {}).get("runs", [])
    if latency:
        rate = latency[0]["target_rate"]
        for name, key, target in (
            ("p50", "p50_ms", None),
            ("p99", "p99_ms", TARGETS["latency_p99_ms"]),
            ("max", "max_ms", None),
        ):
            values = [r[key] for r in latency]
            rows.append(
                (
                    f"(d) produce->committed {name}, ms @ {rate:,.0f} ev/s",
                    f"<= {target}" if target else "",
                    fmt(median(values), 1),
                    ", ".join(fmt(x, 1) for x in values),
                    verdict(median(values), target, False) if target else "",
                )
            )
        achieved = [r["achieved_rate"] for r in latency]
        rows.append(
            (
                "(d) achieved send rate, ev/s",
                "",
                fmt(median(achieved)),
                ", ".join(fmt(x) for x in achieved),
                "",
            )
        )
    peaks = results.get("peak_rss_mb_by_run", [])
    if peaks:
        peak = max(peaks)
        rows.append(
            (
                "(e) worker peak RSS, MB (max over all runs)",
                f"<= {TARGETS['peak_rss_mb']}",
                fmt(peak, 1),
                ", ".join(fmt(x, 0) for x in peaks),
                verdict(peak, TARGETS["peak_rss_mb"], False),
            )
        )
    headers = ("measure", "target", "median", "runs", "")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print()
    print(line.format(*headers))
    print(line.format(*("-" * w for w in widths)))
    for row in rows:
        print(line.format(*row))
    print()


# -------------------------------------------------------------------------------- main


async def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    kafka = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    database = os.environ.get("DATABASE_URL")
    if not kafka or not database:
        raise SystemExit(
            "KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL must be set (or run: bash scripts/bench.sh)"
        )
    services = Services(kafka, database)
    # The worker modules log through structlog (e.g. migrations): keep it to warnings, on stderr.
    configure_logging("warning", "console")
    shapes = quick_shapes() if args.quick else full_shapes()
    wanted = [name for name in args.shapes.split(",") if name]
    latency_seconds = args.latency_seconds or (5.0 if args.quick else 20.0)
    log_dir = LOG_DIR
    profile_dir: Path | None = args.profile

    connection = await asyncpg.connect(services.database_url_for("postgres"))
    try:
        postgres_version = await connection.fetchval("SHOW server_version")
    finally:
        await connection.close()
    reference = Settings(kafka_bootstrap_servers=kafka, database_url=database)
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "quick": args.quick,
        "runs": args.runs,
        "partitions": args.partitions,
        "workers": args.workers,
        "machine": machine_info(services, postgres_version),
        "worker_settings": {
            key: value
            for key, value in reference.masked().items()
            if key.startswith(("batch_", "database_pool", "max_message"))
        },
        "targets": TARGETS,
        "shapes": {},
        "peak_rss_mb_by_run": [],
    }
    began = time.perf_counter()
    now = datetime.now(UTC).replace(microsecond=0)

    for name in wanted:
        if name not in shapes:
            continue
        shape = shapes[name]
        log(f"{name}: building {shape.describe()}")
        workload = build_workload(shape, now)
        log(
            f"{name}: {workload.total:,} messages "
            f"({len(workload.lifecycle):,} lifecycle, {len(workload.heartbeats):,} heartbeats)"
        )
        runs = []
        for run in range(1, args.runs + 1):
            scenario = await create_scenario(services, args.partitions)
            try:
                produce_seconds = await produce_workload(services, scenario, workload)
                log(f"{name} run {run}: produced in {produce_seconds:.1f} s; reading")
                limit_seconds = max(120.0, workload.total / 1_000)
                reader_settings = scenario.worker_settings(services, scenario.reader_group)
                read = await measure_read_limit(reader_settings, workload.total, limit_seconds)
                log(f"{name} run {run}: (a) read limit {read.events_per_second:,.0f} ev/s")
                stages: dict[str, Any] = {}
                if args.stages:
                    decode = await measure_decode_limit(
                        services, scenario, workload.total, limit_seconds
                    )
                    write = await measure_write_limit(services, scenario, workload, limit_seconds)
                    stages = {
                        "decode": asdict(decode),
                        "write": asdict(write),
                        "cpu_ceiling_events_per_second": cpu_ceiling(decode, write),
                    }
                    log(
                        f"{name} run {run}: (a2) read + decode + fold limit "
                        f"{decode.events_per_second:,.0f} ev/s; (a3) write limit "
                        f"{write.events_per_second:,.0f} ev/s, cores {write.extra['cores_used']}; "
                        f"(a4) CPU ceiling {stages['cpu_ceiling_events_per_second']:,.0f} ev/s"
                    )
                log(f"{name} run {run}: starting the worker")
                extension = "pyisession" if args.profiler == "pyinstrument" else "prof"
                profile = profile_dir / f"{name}-{run}.{extension}" if profile_dir else None
                drain, peak = await measure_drain(
                    services,
                    scenario,
                    workload,
                    log_dir / f"{name}-{run}.log",
                    profile,
                    limit_seconds,
                    args.workers,
                )
            finally:
                if not args.keep:
                    await drop_scenario(services, scenario)
            ratio = drain.events_per_second / read.events_per_second
            log(
                f"{name} run {run}: (b) drain {drain.events_per_second:,.0f} ev/s "
                f"({drain.events_per_second_with_startup:,.0f} incl. {drain.startup_seconds:.1f} s "
                f"start-up), ratio {ratio:.2f}, peak RSS {peak:.0f} MB, cores "
                f"{drain.extra['cores_used']}"
            )
            runs.append(
                {
                    "run": run,
                    "messages": workload.total,
                    "produce_seconds": round(produce_seconds, 2),
                    "read": asdict(read),
                    **stages,
                    "drain": asdict(drain),
                    "ratio": ratio,
                    "peak_rss_mb": peak,
                }
            )
            results["peak_rss_mb_by_run"].append(peak)
        results["shapes"][name] = {
            "description": shape.describe(),
            "shape": asdict(shape),
            "messages": workload.total,
            "runs": runs,
            "median": {
                "read_events_per_second": median(r["read"]["events_per_second"] for r in runs),
                **{
                    f"{stage}_events_per_second": median(stage_rates(r)[stage] for r in runs)
                    for stage in STAGE_LABELS
                    if all(stage_rates(r) for r in runs)
                },
                "drain_events_per_second": median(r["drain"]["events_per_second"] for r in runs),
                "drain_second_half_events_per_second": median(
                    r["drain"]["extra"].get("second_half_events_per_second") or float("nan")
                    for r in runs
                ),
                "drain_events_per_second_with_startup": median(
                    r["drain"]["events_per_second_with_startup"] for r in runs
                ),
                "ratio": median(r["ratio"] for r in runs),
            },
        }
        del workload

    if not args.skip_latency:
        rate = args.latency_rate
        if rate is None:
            live = results["shapes"].get("live")
            if live is None:
                raise SystemExit("--latency-rate is needed when the live shape is not run")
            rate = live["median"]["drain_events_per_second"] / 2
        live_shape = shapes["live"]
        fleet = build_fleet(live_shape.customers, live_shape.devices_per_customer, seed=3)
        latency_runs = []
        for run in range(1, args.runs + 1):
            scenario = await create_scenario(services, args.partitions)
            try:
                log(
                    f"latency run {run}: {len(fleet):,} devices at {rate:,.0f} ev/s "
                    f"for {latency_seconds:.0f} s"
                )
                result = await measure_latency(
                    services, scenario, fleet, rate, latency_seconds, log_dir / f"latency-{run}.log"
                )
            finally:
                if not args.keep:
                    await drop_scenario(services, scenario)
            log(
                f"latency run {run}: p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, "
                f"max {result.max_ms:.1f} ms (achieved {result.achieved_rate:,.0f} ev/s), "
                f"{result.worker_batches} batches of {result.mean_batch} msgs, "
                f"{result.mean_write_ms} ms write each, "
                f"peak RSS {result.peak_rss_mb:.0f} MB, cores {result.cores_used}"
            )
            latency_runs.append(asdict(result))
            results["peak_rss_mb_by_run"].append(result.peak_rss_mb)
        results["latency"] = {
            "rate": rate,
            "seconds": latency_seconds,
            "devices": len(fleet),
            "runs": latency_runs,
            "median": {
                key: median(r[key] for r in latency_runs)
                for key in (
                    "p50_ms",
                    "p90_ms",
                    "p99_ms",
                    "max_ms",
                    "stored_p50_ms",
                    "stored_p99_ms",
                    "achieved_rate",
                )
            },
        }

    results["peak_rss_mb"] = max(results["peak_rss_mb_by_run"], default=float("nan"))
    results["total_seconds"] = round(time.perf_counter() - began, 1)
    results["verdicts"] = {
        f"{name}_events_per_second": verdict(
            results["shapes"][name]["median"]["drain_events_per_second"],
            TARGETS[f"{name}_events_per_second"],
            True,
        )
        for name in results["shapes"]
    }
    if "latency" in results:
        results["verdicts"]["latency_p99_ms"] = verdict(
            results["latency"]["median"]["p99_ms"], TARGETS["latency_p99_ms"], False
        )
    results["verdicts"]["peak_rss_mb"] = verdict(
        results["peak_rss_mb"], TARGETS["peak_rss_mb"], False
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs",
        type=int,
        default=None,
        help="runs of each measurement (default 3; 1 with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="small smoke version (< 1 minute)")
    parser.add_argument("--shapes", default="live,backlog", help="comma-separated: live,backlog")
    parser.add_argument("--partitions", type=int, default=4, help="partitions per topic")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes draining together in one group (replicas on this machine)",
    )
    parser.add_argument(
        "--latency-seconds",
        type=float,
        default=None,
        help="length of the fixed-rate phase (default 20, quick 5)",
    )
    parser.add_argument(
        "--latency-rate",
        type=float,
        default=None,
        help="events/s for the latency phase (default: half the live drain median)",
    )
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument(
        "--skip-stages",
        action="store_true",
        help="skip the decode (a2) and write (a3) limits",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="JSON result file (default .local/bench-results.json; "
        ".local/bench-results-quick.json with --quick)",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="run the drain workers under a profiler, writing DIR/<shape>-<run>.*",
    )
    parser.add_argument("--profiler", choices=("cprofile", "pyinstrument"), default="cprofile")
    parser.add_argument("--keep", action="store_true", help="keep topics and databases")
    parser.add_argument(
        "--git-ref",
        default=None,
        help="benchmark this commit's worker instead of the working tree (e.g. HEAD)",
    )
    args = parser.parse_args()
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.output is None:
        name = "bench-results-quick.json" if args.quick else "bench-results.json"
        args.output = str(REPO_ROOT / ".local" / name)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    args.stages = not args.skip_stages

    LOG_DIR.mkdir(parents=True, exist_ok=True)
    for old in LOG_DIR.glob("*.log"):
        old.unlink()
    if args.profile:
        args.profile = Path(args.profile).resolve()
        args.profile.mkdir(parents=True, exist_ok=True)
    code = snapshot_code(CODE_DIR, args.git_ref)
    import_worker_modules(CODE_DIR)
    log(
        f"benchmarking the {code['source']} at {code['commit'][:12]}"
        + (
            f" with {len(code['uncommitted_changes'])} uncommitted change(s)"
            if code["uncommitted_changes"]
            else ""
        )
    )
    results = asyncio.run(run_benchmark(args))
    results["code"] = code
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print_table(results)
    print(f"total time {results['total_seconds']:.0f} s; results written to {output}")
    if args.quick:
        print("(--quick: small sizes, one run; the figures are not comparable with the targets)")


if __name__ == "__main__":
    main()

"""The real worker, `python -m worker.cli run` from the snapshot, as a subprocess: starting
and stopping it, watching what it stored and committed, and (b) its drain of pre-filled
topics."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from scripts.bench import log
from scripts.bench.code_under_test import CODE_DIR
from scripts.bench.meters import CpuMeter, RssSampler
from scripts.bench.scenario import Scenario, Services
from scripts.bench.shapes import Workload
from scripts.bench.stages import RateResult
from scripts.bench.statements import StatementStats

PROGRESS_POLL_SECONDS = 0.02  # drain: how often ingestion_progress is read
# What billing receives of a fleet: license events in the outbox, published or settling
# (withdrawn allocations are gone from it).
LICENSE_EVENTS = (
    "SELECT count(*) FROM license_outbox "
    "WHERE payload->>'type' IN ('license.allocated', 'license.released', 'license.package_changed')"
)


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
        # Last-seen precision (docs/ingestion.md): heartbeats not written, and whether the
        # worker skipped at all (1) when scraped, after the drain.
        "license_worker_heartbeats_skipped_total": "heartbeats_skipped",
        "license_worker_last_seen_skipping": "last_seen_skipping",
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
    machine; 1 by default) of the workload's timed messages, after the messages stored
    beforehand (see `store_beforehand`). Peak RSS is the largest of one process."""
    already = len(workload.stored_beforehand)
    total = already + workload.total  # the stored offsets count from the topics' start
    async with (
        ProgressWatch(services, scenario) as watch,
        StatementStats(services, scenario) as statements,
    ):
        replicas = [
            WorkerProcess(
                scenario.worker_environment(services),
                log_path if number == 0 else log_path.with_suffix(f".{number}.log"),
                profile_path if number == 0 else None,
            ).start()
            for number in range(workers)
        ]
        worker = replicas[0]
        pids = [r.process.pid for r in replicas]  # type: ignore[union-attr]
        # License events of the fleet stored beforehand (its installs allocate): the drain's
        # own are those added after.
        license_events_before = await watch.fetchval(LICENSE_EVENTS)
        cpu = CpuMeter(pids, services)
        # A fleet stored beforehand: its first round is written whatever the precision (a
        # replica that just started remembers nothing), so the rounds after it are also
        # measured apart (CPU and statements): the steady state proper.
        first_round = already + workload.devices if workload.stored_beforehand else None
        after_first = CpuMeter(pids, services)
        after_first_at: float | None = None
        after_first_count = 0
        statements_first_round: list[dict[str, Any]] | None = None
        try:
            deadline = worker.started_at + limit_seconds
            first_at: float | None = None
            first_count = 0
            half_at: float | None = None
            half_count = 0
            stored_at: float | None = None
            polls = 0  # progress reads in the measured window: Postgres work of this script
            while True:
                for replica in replicas:
                    replica.check_alive()
                now = time.perf_counter()
                if now > deadline:
                    raise TimeoutError(
                        f"the worker did not drain {total} messages in {limit_seconds:.0f} s"
                    )
                done = sum((await watch.stored()).values())
                if first_at is not None:
                    polls += 1
                seen = time.perf_counter()
                if done > already and first_at is None:
                    first_at, first_count = seen, done
                    await statements.reset()
                    cpu.start()
                if first_round is not None and after_first_at is None and done >= first_round:
                    after_first_at, after_first_count = seen, done
                    statements_first_round = await statements.read()
                    await statements.reset()
                    after_first.start()
                if done >= already + workload.total / 2 and half_at is None:
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
            after_first_cores = after_first.stop() if after_first_at is not None else None
            statement_stats = await statements.read()
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
            # What billing receives of this fleet: license events in the outbox, published or
            # settling (withdrawn allocations are gone from it).
            license_events = await watch.fetchval(LICENSE_EVENTS) - license_events_before
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
        messages=workload.total,
        events_per_second=(total - first_count) / measured,
        events_per_second_with_startup=workload.total / (finished - worker.started_at),
        startup_seconds=first_at - worker.started_at,
        measured_seconds=measured,
        extra={
            "first_progress_messages": first_count - already,
            # The second half of the messages alone: mostly heartbeats of devices already
            # stored (the installs and first signals, which allocate licenses, come early).
            "second_half_events_per_second": (
                (total - half_count) / (finished - half_at)
                if half_at and finished > half_at
                else None
            ),
            "stored_to_committed_ms": round((finished - stored_at) * 1000, 1),
            "progress_polls": polls,
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
            "license_events": license_events,
            "license_events_stored_beforehand": license_events_before,
            "license_events_per_device": round(license_events / devices, 3) if devices else None,
            "heartbeats_skipped": batches.get("heartbeats_skipped"),
            "last_seen_skipping": batches.get("last_seen_skipping"),
            # pg_stat_statements of the measured window (None unless the server loads it);
            # with a fleet stored beforehand, of the rounds after the first, and of the first
            # round (from the first progress) apart.
            "statements": statement_stats,
            "statements_first_round": statements_first_round,
            "after_first_round": (
                {
                    "events": total - after_first_count,
                    "seconds": round(finished - after_first_at, 3),
                    "cores_used": after_first_cores,
                }
                if after_first_at is not None
                else None
            ),
            "exit_code": code,
            "error_log_lines": len(errors),
        },
    )
    if errors:
        log(f"the worker logged {len(errors)} error line(s), e.g. {errors[0][:300]}")
    return result, max(replica.peak_rss_mb for replica in replicas)


async def store_beforehand(
    services: Services, scenario: Scenario, messages: int, log_path: Path, limit_seconds: float
) -> float:
    """Not timed: the worker stores the first `messages` of the topics (the fleet a steady
    state starts from), commits them and stops. Returns the seconds it took."""
    async with ProgressWatch(services, scenario) as watch:
        worker = WorkerProcess(scenario.worker_environment(services), log_path, None).start()
        try:
            deadline = worker.started_at + limit_seconds
            while True:
                worker.check_alive()
                committed = await watch.committed()
                if committed is not None and sum(committed.values()) >= messages:
                    break
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"the worker did not store {messages} messages in time")
                await asyncio.sleep(0.2)
        finally:
            worker.stop()
    return time.perf_counter() - worker.started_at

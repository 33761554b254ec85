"""The monitor task: probes Kafka and Postgres for /readyz, publishes consumer lag per
assigned partition, and detects stuck partitions (assigned, messages waiting, stored offset
not moving) so the worker can recreate its consumer without a human."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog

from worker.db.errors import is_transient_database_error
from worker.db.repository import Repository
from worker.licensing.sweep_rules import PartitionKey, StoredProgress
from worker.ops import metrics
from worker.ops.health import Liveness, Readiness
from worker.ops.lag import PartitionLag, Watch, partition_lag, stuck_partitions, watch_partitions
from worker.ops.logs import error_fields
from worker.settings import Settings

log = structlog.get_logger(__name__)
PROBE_TIMEOUT_SECONDS = 5.0


class Monitor:
    def __init__(
        self,
        *,
        settings: Settings,
        repository: Repository,
        partition_ends: Callable[[], Any],
        assignment: Callable[[], set[PartitionKey]],
        liveness: Liveness,
        readiness: Readiness,
        on_stuck: Callable[[list[PartitionKey]], None],
        held: Callable[[], bool] = lambda: False,
    ) -> None:
        """`held`: True while ingestion holds its partitions on purpose (a batch waiting
        for the console, worker/ingest/loop.py): they are then not stuck."""
        self._settings = settings
        self._repository = repository
        self._partition_ends = partition_ends
        self._assignment = assignment
        self._liveness = liveness
        self._readiness = readiness
        self._on_stuck = on_stuck
        self._held = held
        self._watched: dict[PartitionKey, Watch] = {}
        self._reported: set[PartitionKey] = set()

    async def run_forever(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            await self.check_once()
            self._liveness.beat("monitor")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self._settings.monitor_interval_seconds)

    async def check_once(self) -> None:
        postgres_ok = await self._probe("postgres", self._repository.ping)
        ends: dict[PartitionKey, int] = {}

        async def read_ends() -> None:
            ends.update(await self._partition_ends())

        kafka_ok = await self._probe("kafka", read_ends)
        if postgres_ok and kafka_ok:
            try:
                await self._measure_lag(ends)
            except Exception as error:
                # Postgres went away since the probe: the next check measures again.
                if not is_transient_database_error(error):
                    raise
                log.warning("monitor.lag_unavailable", **error_fields(error))
                self._readiness.set("postgres", answered=False)

    async def _probe(self, service: str, probe: Callable[[], Any]) -> bool:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
                await probe()
        except Exception as error:
            log.warning("monitor.probe_failed", service=service, error=type(error).__name__)
            self._readiness.set(service, answered=False)
            return False
        self._readiness.set(service, answered=True)
        return True

    async def _measure_lag(self, ends: dict[PartitionKey, int]) -> None:
        rows = await self._repository.fetch("ingestion_progress", list(self._settings.agent_topics))
        stored = {
            (row["topic"], row["partition"]): StoredProgress(
                row["next_offset"], row["last_message_at"]
            )
            for row in rows
        }
        assigned = {partition for partition in self._assignment() if partition in ends}
        now = datetime.now(UTC)
        lags = {p: partition_lag(ends[p], stored.get(p), now) for p in assigned}
        self._publish(lags)
        offsets = {p: stored[p].next_offset if p in stored else 0 for p in assigned}
        if self._held():  # waiting on purpose, with its own metric and log lines
            self._watched = {}
            metrics.STUCK_PARTITIONS.set(0)
            return
        self._watched = watch_partitions(self._watched, offsets, time.monotonic())
        stuck = stuck_partitions(
            self._watched, lags, time.monotonic(), self._settings.stuck_partition_seconds
        )
        self._liveness.stuck_partitions = [f"{topic}[{partition}]" for topic, partition in stuck]
        metrics.STUCK_PARTITIONS.set(len(stuck))
        if stuck:
            log.error("ingest.partitions_stuck", partitions=self._liveness.stuck_partitions)
            self._watched = {}  # a fresh consumer gets a fresh bound
            self._on_stuck(stuck)

    def _publish(self, lags: dict[PartitionKey, PartitionLag]) -> None:
        group = self._settings.consumer_group
        for topic, partition in self._reported - set(lags):
            metrics.CONSUMER_LAG_MESSAGES.remove(group, topic, str(partition))
            metrics.CONSUMER_LAG_SECONDS.remove(group, topic, str(partition))
        for (topic, partition), lag in lags.items():
            labels = (group, topic, str(partition))
            metrics.CONSUMER_LAG_MESSAGES.labels(*labels).set(lag.messages)
            metrics.CONSUMER_LAG_SECONDS.labels(*labels).set(lag.seconds)
        self._reported = set(lags)

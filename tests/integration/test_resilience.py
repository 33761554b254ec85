"""Crashes, outages and rebalances with real worker processes: nothing lost, nothing doubled."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor

from tests.support import (
    Services,
    WorkerProcess,
    committed_offsets_total,
    fetch,
    fetchval,
    make_settings,
    wait_until,
)
from worker.settings import Settings
from worker.sim.fleet import agent_event, build_fleet, encode, heartbeat_rounds

pytestmark = pytest.mark.integration

START = datetime(2026, 11, 1, tzinfo=UTC)
INTERVAL = timedelta(minutes=5)


class FleetStream:
    """Produces a fleet's installs, then heartbeat rounds, at a steady pace in the background."""

    def __init__(self, services: Services, settings: Settings, devices: int, rounds: int) -> None:
        self.fleet = build_fleet(customers=4, devices_per_customer=devices // 4)
        self.rounds = rounds
        self._services = services
        self._settings = settings
        self.sent = 0

    @property
    def total(self) -> int:
        return len(self.fleet) * (self.rounds + 1)

    @property
    def last_heartbeat_at(self) -> datetime:
        return START + INTERVAL * (self.rounds - 1)

    async def run(self, pause_every: int = 500, pause_seconds: float = 0.05) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self._services.kafka_bootstrap_servers, acks="all", linger_ms=5
        )
        await producer.start()
        try:
            for device in self.fleet:
                event = agent_event(device, "install", START - timedelta(hours=1))
                await producer.send(self._settings.lifecycle_topic, encode(event), key=device.key)
                await self._count(pause_every, pause_seconds)
            for device, at in heartbeat_rounds(self.fleet, self.rounds, START, INTERVAL):
                event = agent_event(device, "heartbeat", at)
                await producer.send(self._settings.heartbeat_topic, encode(event), key=device.key)
                await self._count(pause_every, pause_seconds)
            await producer.flush()
        finally:
            await producer.stop()

    async def _count(self, pause_every: int, pause_seconds: float) -> None:
        self.sent += 1
        if self.sent % pause_every == 0:
            await asyncio.sleep(pause_seconds)


async def stored_offsets(database_url: str) -> int:
    return int(
        await fetchval(database_url, "SELECT coalesce(sum(next_offset), 0) FROM ingestion_progress")
    )


async def wait_for_stored(database_url: str, at_least: int, timeout: float = 120) -> None:
    async def enough() -> bool:
        return await stored_offsets(database_url) >= at_least

    await wait_until(enough, timeout=timeout, interval=0.05)


async def assert_everything_stored_once(
    services: Services, settings: Settings, database_url: str, stream: FleetStream
) -> None:
    topics = list(settings.agent_topics)

    async def all_committed() -> bool:
        committed = await committed_offsets_total(
            services.kafka_bootstrap_servers, settings.consumer_group, topics
        )
        return committed >= stream.total

    await wait_until(all_committed, timeout=180)
    devices = await fetch(database_url, "SELECT last_seen_at, protected, user_id FROM devices")
    assert len(devices) == len(stream.fleet)
    assert {row["last_seen_at"] for row in devices} == {stream.last_heartbeat_at}
    assert all(row["protected"] for row in devices)
    lifecycle = await fetchval(database_url, "SELECT count(*) FROM device_lifecycle_events")
    assert lifecycle == len(stream.fleet), "each install recorded exactly once"
    users_behind = await fetchval(
        database_url,
        "SELECT count(*) FROM users WHERE last_seen_at <> $1",
        stream.last_heartbeat_at,
    )
    assert users_behind == 0
    assert await stored_offsets(database_url) == stream.total


async def test_sigkill_mid_stream_then_restart_loses_and_doubles_nothing(
    services: Services, database_url: str, topics: dict[str, str], tmp_path: Path
) -> None:
    settings = make_settings(services, database_url, topics, batch_max_records=300)
    stream = FleetStream(services, settings, devices=400, rounds=40)
    producing = asyncio.create_task(stream.run())
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        await wait_for_stored(database_url, stream.total // 4)
        worker.kill()
        killed_at = await stored_offsets(database_url)
        assert killed_at < stream.total, "the kill must land in the middle of the stream"
        worker = WorkerProcess(settings, tmp_path / "worker.log").start()
        await producing
        await assert_everything_stored_once(services, settings, database_url, stream)
        assert worker.terminate() == 0
    finally:
        producing.cancel()
        with contextlib.suppress(Exception):
            worker.kill()


async def test_postgres_restart_under_load_pauses_and_loses_nothing(
    services: Services, database_url: str, topics: dict[str, str], tmp_path: Path
) -> None:
    settings = make_settings(services, database_url, topics, batch_max_records=300)
    stream = FleetStream(services, settings, devices=400, rounds=30)
    producing = asyncio.create_task(stream.run())
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        await wait_for_stored(database_url, stream.total // 5)
        await asyncio.to_thread(services.services_script, "stop-postgres")
        await asyncio.sleep(3)
        assert worker.process is not None
        assert worker.process.poll() is None, "the worker waits out the outage"
        await asyncio.to_thread(services.services_script, "start-postgres")
        await producing
        await assert_everything_stored_once(services, settings, database_url, stream)
        assert "database.unavailable" in worker.log_text()
        assert worker.terminate() == 0
    finally:
        producing.cancel()
        with contextlib.suppress(Exception):
            worker.kill()


async def test_two_workers_share_partitions_and_one_takes_over(
    services: Services, database_url: str, topics: dict[str, str], tmp_path: Path
) -> None:
    settings = make_settings(services, database_url, topics, batch_max_records=300)
    stream = FleetStream(services, settings, devices=400, rounds=40)
    first = WorkerProcess(settings, tmp_path / "first.log").start()
    second = WorkerProcess(settings, tmp_path / "second.log").start()
    producing = asyncio.create_task(stream.run())
    try:

        async def both_assigned() -> bool:
            return all(
                "ingest.partitions_assigned" in worker.log_text() and "agent." in worker.log_text()
                for worker in (first, second)
            )

        await wait_until(both_assigned, timeout=60)
        await wait_for_stored(database_url, stream.total // 4)
        assert first.terminate() == 0, "a stopping worker finishes its batch and exits cleanly"
        await producing
        await assert_everything_stored_once(services, settings, database_url, stream)
        assert (
            "ingest.partitions_revoked" in second.log_text()
            or "ingest.partitions_assigned" in second.log_text()
        )
        assert second.terminate() == 0
    finally:
        producing.cancel()
        for worker in (first, second):
            with contextlib.suppress(Exception):
                worker.kill()


async def test_kafka_broker_restart_under_load_is_waited_out(
    services: Services, database_url: str, topics: dict[str, str], tmp_path: Path
) -> None:
    settings = make_settings(services, database_url, topics, batch_max_records=100)
    stream = FleetStream(services, settings, devices=400, rounds=40)
    await stream.run()  # everything is in the topic before the broker goes away
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        await wait_for_stored(database_url, stream.total // 5)
        await asyncio.to_thread(services.services_script, "stop-kafka")
        assert await stored_offsets(database_url) < stream.total, "the outage lands mid-stream"
        await asyncio.sleep(3)
        assert worker.process is not None
        assert worker.process.poll() is None, "the worker waits for the broker"
        await asyncio.to_thread(services.services_script, "start-kafka")
        await assert_everything_stored_once(services, settings, database_url, stream)
        assert worker.terminate() == 0
    finally:
        with contextlib.suppress(Exception):
            worker.kill()


SLOW_DEVICE_WRITES = """
CREATE FUNCTION slow_device_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_sleep(0.005);
    RETURN NEW;
END $$;
CREATE TRIGGER slow_device_write BEFORE INSERT OR UPDATE ON devices
    FOR EACH ROW EXECUTE FUNCTION slow_device_write();
"""


def agent_assignments(log_text: str) -> list[int]:
    """How many agent partitions each `ingest.partitions_assigned` line of a worker log gave it."""
    counts = []
    for line in log_text.splitlines():
        if '"ingest.partitions_assigned"' in line and "agent." in line:
            counts.append(sum("agent." in p for p in json.loads(line)["partitions"]))
    return counts


async def test_a_replica_joining_mid_stream_gets_half_at_once(
    services: Services, database_url: str, topics: dict[str, str], tmp_path: Path
) -> None:
    """While the first worker writes one batch and fetches the next, a second one joins.
    The first must hand over its batch within the rebalance (it used to wait the whole
    flush timeout for a lock its own blocked fetch held, and was evicted: both then read
    every partition)."""
    # Slow writes (over a second a batch): the loop then polls Kafka while it waits for the
    # write, and that poll is what a starting rebalance used to hold.
    superuser = await asyncpg.connect(services.superuser_url(database_url))
    try:
        await superuser.execute(SLOW_DEVICE_WRITES)
    finally:
        await superuser.close()
    settings = make_settings(services, database_url, topics, batch_max_records=300)
    stream = FleetStream(services, settings, devices=400, rounds=12)
    first = WorkerProcess(settings, tmp_path / "first.log").start()
    producing = asyncio.create_task(stream.run())
    second: WorkerProcess | None = None
    try:
        await wait_for_stored(database_url, 600)
        second = WorkerProcess(settings, tmp_path / "second.log").start()
        joined = second

        async def split() -> bool:
            return agent_assignments(first.log_text())[-1:] == [4] and agent_assignments(
                joined.log_text()
            )[-1:] == [4]

        await wait_until(split, timeout=30)
        assert agent_assignments(joined.log_text()) == [4], "never given every partition"
        assert "revoked_mid_batch" not in first.log_text()
        await producing
        await assert_everything_stored_once(services, settings, database_url, stream)
        assert first.terminate() == 0
        assert second.terminate() == 0
    finally:
        producing.cancel()
        for worker in (first, second):
            if worker is not None:
                with contextlib.suppress(Exception):
                    worker.kill()


class SlowToRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    """A group member that takes `seconds` to give up its partitions: every rebalance of its
    group waits for it (its rebalance timeout is longer)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.revoking = asyncio.Event()
        self.released = asyncio.Event()

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked:
            self.revoking.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.released.wait(), self.seconds)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        pass


async def test_sigterm_while_a_rebalance_holds_the_join_exits_promptly(
    services: Services, database_url: str, topics: dict[str, str], tmp_path: Path
) -> None:
    """A worker told to stop while its group waits for a slow member must not wait for that
    rebalance to end: the fault suite saw a replica outlive SIGTERM by more than 90 s."""
    settings = make_settings(services, database_url, topics)
    slow = SlowToRevoke(seconds=80)
    member = AIOKafkaConsumer(
        bootstrap_servers=services.kafka_bootstrap_servers,
        group_id=settings.consumer_group,
        session_timeout_ms=120_000,
        rebalance_timeout_ms=150_000,
        heartbeat_interval_ms=1_000,
        partition_assignment_strategy=(RangePartitionAssignor,),  # the worker's (one group)
    )
    member.subscribe(list(settings.agent_topics), listener=slow)
    await member.start()
    worker: WorkerProcess | None = None
    try:
        await wait_until(lambda: _has_assignment(member), timeout=60)
        worker = WorkerProcess(settings, tmp_path / "worker.log").start()
        await asyncio.wait_for(slow.revoking.wait(), timeout=60)
        await asyncio.sleep(3)  # the worker now waits in its join
        started = time.monotonic()
        assert worker.terminate(timeout=75) == 0
        stopped_in = time.monotonic() - started
        assert stopped_in < 30, f"stopped in {stopped_in:.0f} s, waiting for the rebalance"
        assert "kafka.consumer_stop_timed_out" in worker.log_text()
    finally:
        if worker is not None:
            with contextlib.suppress(Exception):
                worker.kill()
        slow.released.set()
        await member.stop()


async def _has_assignment(consumer: AIOKafkaConsumer) -> bool:
    await asyncio.sleep(0)
    return bool(consumer.assignment())

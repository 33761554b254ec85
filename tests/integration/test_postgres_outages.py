"""Postgres going away and coming back, with a real `license-worker run` process: no task
dies of it, ingestion resumes within about a second of the database's return, and the log
stays one JSON object per line throughout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from tests.support import Services, WorkerProcess, fetchval, make_settings, wait_until
from worker.settings import Settings
from worker.sim.fleet import SimulatedDevice, agent_event, encode

pytestmark = pytest.mark.integration

START = datetime(2026, 11, 1, tzinfo=UTC)
# About a minute on the development machine: each restart takes under a second.
RESTARTS = 20
RECOVERY_BOUND_SECONDS = 3.0


def outage_settings(services: Services, database_url: str, topics: dict[str, str]) -> Settings:
    """Every background task touches Postgres several times a second."""
    return make_settings(
        services,
        database_url,
        topics,
        monitor_interval_seconds=0.2,
        sweep_interval_seconds=0.3,
        relay_poll_seconds=0.2,
    )


class Trickle:
    """Installs a new device every `period` seconds in the background, so that the worker has
    something to write at every moment of an outage."""

    def __init__(self, services: Services, settings: Settings, period: float = 0.1) -> None:
        self._services = services
        self._topic = settings.lifecycle_topic
        self._period = period
        self.sent = 0

    async def send(self, producer: AIOKafkaProducer) -> None:
        device = SimulatedDevice("cust-outage", f"dev-{self.sent:06d}", None, "business")
        event = agent_event(device, "install", START + timedelta(seconds=self.sent))
        await producer.send_and_wait(self._topic, encode(event), key=device.key)
        self.sent += 1

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Trickle]:
        producer = AIOKafkaProducer(
            bootstrap_servers=self._services.kafka_bootstrap_servers, acks="all", linger_ms=5
        )
        await producer.start()

        async def produce_forever() -> None:
            while True:
                await self.send(producer)
                await asyncio.sleep(self._period)

        producing = asyncio.create_task(produce_forever())
        try:
            yield self
        finally:
            producing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producing
            await producer.stop()


async def stored_devices(database_url: str) -> int:
    return int(await fetchval(database_url, "SELECT count(*) FROM devices"))


async def wait_for_devices(database_url: str, at_least: int, timeout: float = 60) -> None:
    async def enough() -> bool:
        return await stored_devices(database_url) >= at_least

    await wait_until(enough, timeout=timeout, interval=0.05)


def assert_worker_alive(worker: WorkerProcess, when: str) -> None:
    assert worker.process is not None
    exit_code = worker.process.poll()
    tail = worker.log_text()[-4000:]
    assert exit_code is None, f"the worker exited ({exit_code}) {when}:\n{tail}"


def log_lines(worker: WorkerProcess) -> list[str]:
    return [line for line in worker.log_text().splitlines() if line.strip()]


def assert_every_line_is_json(worker: WorkerProcess) -> None:
    """LOG_FORMAT=json: every line, the libraries' and asyncio's included, one JSON object,
    and no traceback anywhere (an expected connection error is logged by its class)."""
    for line in log_lines(worker):
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"a log line that is not JSON: {line!r}")
        assert isinstance(entry, dict), line
        assert "Traceback" not in line, line
        assert "exception" not in entry, line


async def restart_postgres(services: Services, down_seconds: float) -> None:
    await asyncio.to_thread(services.services_script, "stop-postgres")
    await asyncio.sleep(down_seconds)
    await asyncio.to_thread(services.services_script, "start-postgres")


async def test_the_worker_survives_twenty_postgres_restarts_in_a_row(
    services: Services, database_url: str, topics: dict[str, str], tmp_path: Path
) -> None:
    settings = outage_settings(services, database_url, topics)
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        async with Trickle(services, settings).running() as trickle:
            await wait_for_devices(database_url, 1)
            for restart in range(RESTARTS):
                # Down for different lengths, so that the restarts land at different points
                # of each task's cycle (the monitor between its probe and its lag query).
                await restart_postgres(services, down_seconds=0.3 + 0.2 * (restart % 5))
                await asyncio.sleep(0.3 + 0.15 * (restart % 3))
                assert_worker_alive(worker, f"after restart {restart + 1} of {RESTARTS}")
            # Ingestion still works: what was produced during and after the restarts is stored.
            await wait_for_devices(database_url, trickle.sent + 3, timeout=30)
        assert_worker_alive(worker, "after the restarts")
        text = worker.log_text()
        assert "worker.task_died" not in text
        assert "worker.crashed" not in text
        assert worker.terminate() == 0
        assert_every_line_is_json(worker)
    finally:
        with contextlib.suppress(Exception):
            worker.kill()
        services.services_script("start-postgres")  # if the test failed mid-outage


async def devices_sent_from(database_url: str, first: int) -> int:
    """Stored devices among those the trickle sent from number `first` on."""
    return int(
        await fetchval(
            database_url, "SELECT count(*) FROM devices WHERE device_id >= $1", f"dev-{first:06d}"
        )
    )


async def test_ingestion_resumes_within_seconds_of_postgres_return(
    services: Services, database_url: str, topics: dict[str, str], tmp_path: Path
) -> None:
    # The backoff starts where a long outage leaves it (10-20 s a retry): when ingestion
    # resumes must depend on when the database is back, not on how long it was away.
    settings = outage_settings(services, database_url, topics).model_copy(
        update={"retry_initial_seconds": 20.0, "retry_max_seconds": 20.0}
    )
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        async with Trickle(services, settings).running() as trickle:
            await wait_for_devices(database_url, 5)
            await asyncio.to_thread(services.services_script, "stop-postgres")
            # Whatever is sent from now on can only be stored once Postgres is back.
            first_after_stop = trickle.sent
            await asyncio.sleep(6)
            assert_worker_alive(worker, "during the outage")
            await asyncio.to_thread(services.services_script, "start-postgres")
            back_at = time.monotonic()

            async def stored_again() -> bool:
                return await devices_sent_from(database_url, first_after_stop) > 0

            await wait_until(stored_again, timeout=60, interval=0.05)
            recovery = time.monotonic() - back_at
            print(f"first row stored {recovery:.2f} s after Postgres was back")
            await wait_for_devices(database_url, trickle.sent, timeout=30)
        assert recovery <= RECOVERY_BOUND_SECONDS, f"took {recovery:.1f} s"
        assert worker.terminate() == 0
        assert_every_line_is_json(worker)
    finally:
        with contextlib.suppress(Exception):
            worker.kill()
        services.services_script("start-postgres")  # if the test failed mid-outage

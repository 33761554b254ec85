"""`license-worker run`: wires the clients together, supervises the tasks, shuts down in order.

Shutdown order (SIGTERM or SIGINT): stop fetching, finish the batch in hand and commit it,
stop the Kafka clients (the producer flushes), close the database pool.
"""

from __future__ import annotations

import asyncio
import signal

import structlog
from prometheus_client import start_http_server

from worker.backoff import Backoff
from worker.clock import Clock, SystemClock
from worker.ingest import IngestionLoop
from worker.kafka_clients import (
    PartitionEnds,
    create_consumer,
    create_producer,
    start_with_retry,
)
from worker.relay import Relay
from worker.repository import Repository, is_transient_database_error
from worker.settings import Settings
from worker.sweeper import Sweeper

log = structlog.get_logger(__name__)


class Worker:
    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self._settings = settings
        self._clock = clock or SystemClock()
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        settings = self._settings
        log.info("worker.starting", config=settings.masked())
        if settings.metrics_port:
            start_http_server(settings.metrics_port)
        repository = await _connect_database(settings)
        producer = create_producer(settings)
        consumer = create_consumer(settings)
        partition_ends = PartitionEnds(settings)
        try:
            await start_with_retry("kafka-producer", producer.start, settings)
            await start_with_retry("kafka-lag-reader", partition_ends.start, settings)
            ingest = IngestionLoop(
                settings=settings,
                consumer=consumer,
                producer=producer,
                repository=repository,
                clock=self._clock,
                stopping=self._stopping,
            )
            consumer.subscribe(list(settings.agent_topics), listener=ingest.rebalance_listener())
            await start_with_retry("kafka-consumer", consumer.start, settings)
            tasks = [asyncio.create_task(ingest.run(), name="ingest")]
            if settings.relay_enabled:
                relay = Relay(settings, repository, producer)
                tasks.append(asyncio.create_task(relay.run_forever(self._stopping), name="relay"))
            if settings.sweep_enabled:
                sweeper = Sweeper(settings, repository, partition_ends, self._clock, self._stopping)
                tasks.append(asyncio.create_task(sweeper.run_forever(), name="sweeper"))
            await self._supervise(tasks)
        finally:
            await consumer.stop()
            await partition_ends.stop()
            await producer.stop()
            await repository.close()
            log.info("worker.stopped")

    async def _supervise(self, tasks: list[asyncio.Task[None]]) -> None:
        """Returns once asked to stop and every task has finished its work in hand. If a task
        dies, the others are stopped in order and the error is raised: the process exits
        loudly instead of limping on without, say, its relay."""
        stop_requested = asyncio.create_task(self._stopping.wait(), name="stop-requested")
        done, _ = await asyncio.wait([*tasks, stop_requested], return_when=asyncio.FIRST_COMPLETED)
        died = [task for task in done if task is not stop_requested and not self._stopping.is_set()]
        if died:
            log.error("worker.task_died", task=died[0].get_name())
        else:
            log.info("worker.stopping")
        self._stopping.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        stop_requested.cancel()
        for task in died:
            task.result()  # re-raises the task's error
            raise RuntimeError(f"task {task.get_name()} ended without being asked to stop")


async def _connect_database(settings: Settings) -> Repository:
    backoff = Backoff(settings.retry_initial_seconds, settings.retry_max_seconds)
    while True:
        try:
            return await Repository.connect(
                settings.database_url.get_secret_value(), settings.database_pool_size
            )
        except Exception as error:
            if not is_transient_database_error(error):
                raise
            delay = backoff.next_delay()
            log.warning(
                "startup.waiting",
                service="postgres",
                error=type(error).__name__,
                retry_in=round(delay, 2),
            )
            await asyncio.sleep(delay)


def install_signal_handlers(worker: Worker) -> None:
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, worker.stop)

"""`license-worker run`: wires the clients together, supervises the tasks, shuts down in order.

Shutdown order (SIGTERM or SIGINT): stop fetching, finish the batch in hand and commit it,
stop the Kafka clients (the producer flushes), close the database pool. A signal while the
worker still waits for Kafka or Postgres at start-up ends that wait: nothing is in hand yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

from worker.clock import Clock, SystemClock
from worker.db.connect import ensure_migrated
from worker.db.errors import DatabaseAccessRefused, database_refusal, is_transient_database_error
from worker.db.repository import Repository
from worker.db.wait import DatabaseAnswers, database_answers, pause, wait_to_retry
from worker.failures import PortUnavailable, connection_reason
from worker.ingest.consumer_session import ConsumerSession
from worker.ingest.decoding import RejectReason
from worker.ingest.loop import IngestionLoop
from worker.kafka.clients import (
    PartitionEnds,
    create_consumer,
    create_producer,
    start_with_retry,
    stop_consumer,
)
from worker.licensing.relay import Relay
from worker.licensing.sweeper import Sweeper
from worker.ops import metrics
from worker.ops.health import HealthServer, Liveness, Readiness, health_app, serve_health
from worker.ops.logs import error_fields
from worker.ops.monitor import Monitor
from worker.retry import Backoff, Stopped, retry
from worker.settings import Settings
from worker.tenants.loop import AdminLoop
from worker.weak_settings import configuration_weaknesses, enforce, role_weaknesses

log = structlog.get_logger(__name__)
T = TypeVar("T")

# Python's cycle collector runs a young collection every 700 net allocations by default; a
# 5,000-message batch allocates hundreds of thousands of objects (records, events, rows),
# almost none in cycles (reference counting frees them). At the default, collections took
# about a third of the decoding and folding time (scripts/bench_gc.py).
YOUNG_COLLECTION_THRESHOLD = 50_000
OLDER_COLLECTION_THRESHOLDS = (20, 20)


def tune_garbage_collection() -> None:
    """Moves everything alive after start-up (modules, schemas, pools) out of the collector's
    sight, and collects young objects less often. Cycles are still collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *OLDER_COLLECTION_THRESHOLDS)


class StoppedDuringStartup(Exception):
    """The worker was asked to stop while it waited for Kafka or Postgres to answer."""


class Worker:
    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        settings.required_pseudonym_key()  # event ids and the purge: refuse now, not later
        self._settings = settings
        self._clock = clock or SystemClock()
        self._stopping = asyncio.Event()
        # Set to end the current consumer's life: on stop, or to recreate a stuck consumer.
        self._consumer_done = asyncio.Event()
        self._consumer: Any = None
        self._ingestion: IngestionLoop | None = None
        self.liveness = Liveness()
        self.readiness = Readiness()

    def stop(self) -> None:
        self._stopping.set()
        self._consumer_done.set()

    async def run(self) -> None:
        settings = self._settings
        log.info("worker.starting", config=settings.masked())
        enforce(configuration_weaknesses(settings, os.environ), strict=settings.strict_security)
        topics = [*settings.agent_topics, settings.admin_topic]
        metrics.initialise(topics, [reason.value for reason in RejectReason])
        try:
            async with contextlib.AsyncExitStack() as resources:
                if settings.metrics_port:
                    server = _serve_health_or_refuse(settings, self.liveness, self.readiness)
                    resources.callback(server.server_close)
                    resources.callback(server.shutdown)
                clients = await self._unless_stopped(self._start_clients(resources))
                tune_garbage_collection()
                await self._supervise(self._tasks(*clients))
        except StoppedDuringStartup:
            log.info("worker.stopped_during_startup")
        finally:
            log.info("worker.stopped")

    async def _start_clients(
        self, resources: contextlib.AsyncExitStack
    ) -> tuple[Repository, Repository, Any, PartitionEnds]:
        """Connects to Postgres and starts the shared Kafka clients, waiting for each while
        it is unreachable; each is closed with `resources`, in reverse order."""
        settings = self._settings
        # Two pools: ingestion never waits for a connection held by the relay, the sweeper
        # or the monitor.
        repository = await _connect_database(settings, settings.database_pool_size)
        resources.push_async_callback(repository.close)
        await ensure_migrated(repository, settings.database_url.get_secret_value())
        await _check_database_role(repository, settings)
        background = await _connect_database(settings, settings.background_pool_size)
        resources.push_async_callback(background.close)
        producer = create_producer(settings)
        resources.push_async_callback(producer.stop)
        await start_with_retry("kafka-producer", producer.start, settings)
        partition_ends = PartitionEnds(settings)
        resources.push_async_callback(partition_ends.stop)
        await start_with_retry("kafka-lag-reader", partition_ends.start, settings)
        return repository, background, producer, partition_ends

    async def _unless_stopped(self, operation: Awaitable[T]) -> T:
        """Awaits a start-up step that may wait for Kafka or Postgres, unless the worker is
        asked to stop first: then the step is cancelled and StoppedDuringStartup raised."""
        step = asyncio.ensure_future(operation)
        stop_requested = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({step, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_requested.cancel()
        if step.done():
            return step.result()
        step.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await step
        raise StoppedDuringStartup

    def _tasks(
        self,
        repository: Repository,
        background: Repository,
        producer: Any,
        partition_ends: PartitionEnds,
    ) -> list[asyncio.Task[None]]:
        settings, liveness, slack = (
            self._settings,
            self.liveness,
            self._settings.liveness_slack_seconds,
        )
        liveness.register("ingest", slack)
        tasks = [
            asyncio.create_task(self._ingest(repository, producer, partition_ends), name="ingest")
        ]
        if settings.admin_enabled:
            liveness.register("admin", settings.batch_max_wait_ms / 1000 + slack)
            admin = functools.partial(self._admin, repository, producer)
            tasks.append(self._through_outages("admin", admin, repository))
        if settings.relay_enabled:
            liveness.register("relay", settings.relay_poll_seconds + slack)
            relay = Relay(
                settings,
                background,
                producer,
                beat=lambda: liveness.beat("relay"),
                clock=self._clock,
            )
            publish = functools.partial(relay.run_forever, self._stopping)
            tasks.append(self._through_outages("relay", publish, background))
        if settings.sweep_enabled:
            liveness.register("sweeper", settings.sweep_interval_seconds + slack)
            sweeper = Sweeper(
                settings,
                background,
                partition_ends,
                self._clock,
                stopping=self._stopping,
                beat=lambda: liveness.beat("sweeper"),
            )
            tasks.append(self._through_outages("sweeper", sweeper.run_forever, background))
        liveness.register("monitor", settings.monitor_interval_seconds + slack)
        monitor = Monitor(
            settings=settings,
            repository=background,
            partition_ends=partition_ends,
            assignment=self._assignment,
            liveness=liveness,
            readiness=self.readiness,
            on_stuck=self._recreate_consumer,
            held=self._ingestion_held,
        )
        check = functools.partial(monitor.run_forever, self._stopping)
        tasks.append(self._through_outages("monitor", check, background))
        return tasks

    def _through_outages(
        self, name: str, run: Callable[[], Awaitable[None]], database: Repository
    ) -> asyncio.Task[None]:
        return asyncio.create_task(self._run_through_outages(name, run, database), name=name)

    async def _run_through_outages(
        self, name: str, run: Callable[[], Awaitable[None]], database: Repository
    ) -> None:
        """Runs a background task's loop, and runs it again if a Postgres or Kafka outage
        escapes it, once the database answers (or after a backoff, for Kafka): an outage
        never ends the process. Any other error ends the task, and `_supervise` the worker."""
        settings = self._settings
        backoff = Backoff(settings.retry_initial_seconds, settings.retry_max_seconds)

        async def wait(error: Exception) -> None:
            metrics.TASK_RESTARTS.labels(name).inc()
            log.warning("worker.task_interrupted", task=name, **error_fields(error))
            if is_transient_database_error(error):
                await wait_to_retry(database.answers, backoff, self._stopping, task=name)
            else:
                await pause(self._stopping, backoff.next_delay())

        if self._stopping.is_set():
            return
        with contextlib.suppress(Stopped):
            await retry(run, retriable=is_outage, wait=wait, stopping=self._stopping)

    async def _ingest(
        self, repository: Repository, producer: Any, partition_ends: PartitionEnds
    ) -> None:
        """Runs the ingestion loop on a consumer; recreates the consumer when the monitor
        finds a partition stuck, until the worker stops."""
        settings = self._settings
        while not self._stopping.is_set():
            self._consumer_done = asyncio.Event()
            consumer = create_consumer(settings)
            session = self._session("ingest", consumer, producer, repository, self._consumer_done)
            console_behind = functools.partial(
                partition_ends.group_behind, settings.admin_consumer_group, settings.admin_topic
            )
            ingest = self._ingestion = IngestionLoop(session, console_behind)
            consumer.subscribe(list(settings.agent_topics), listener=ingest.rebalance_listener())
            try:
                await self._unless_stopped(
                    start_with_retry("kafka-consumer", consumer.start, settings)
                )
                self._consumer = consumer
                await ingest.run()
            except StoppedDuringStartup:
                return
            finally:
                self._consumer = None
                await stop_consumer(consumer, self._stopping, settings.consumer_group)
            if not self._stopping.is_set():
                metrics.CONSUMER_RECREATIONS.inc()
                log.warning("ingest.consumer_recreated")

    async def _admin(self, repository: Repository, producer: Any) -> None:
        """Applies the console's administrative events (own consumer group)."""
        settings = self._settings
        consumer = create_consumer(settings, settings.admin_consumer_group)
        admin = AdminLoop(self._session("admin", consumer, producer, repository, self._stopping))
        consumer.subscribe([settings.admin_topic], listener=admin.rebalance_listener())
        try:
            await self._unless_stopped(
                start_with_retry("kafka-admin-consumer", consumer.start, settings)
            )
            await admin.run()
        except StoppedDuringStartup:
            return
        finally:
            await stop_consumer(consumer, self._stopping, settings.admin_consumer_group)

    def _session(
        self,
        task: str,
        consumer: Any,
        producer: Any,
        repository: Repository,
        stopping: asyncio.Event,
    ) -> ConsumerSession:
        """A consumer session for the loop `task` (which names its liveness beat too)."""
        return ConsumerSession(
            settings=self._settings,
            consumer=consumer,
            producer=producer,
            repository=repository,
            clock=self._clock,
            stopping=stopping,
            beat=lambda: self.liveness.beat(task),
            task=task,
        )

    def _ingestion_held(self) -> bool:
        return self._ingestion is not None and self._ingestion.waiting_for_console

    def _recreate_consumer(self, stuck: list[tuple[str, int]]) -> None:
        self._consumer_done.set()

    def _assignment(self) -> set[tuple[str, int]]:
        consumer = self._consumer
        if consumer is None:
            return set()
        return {(tp.topic, tp.partition) for tp in consumer.assignment()}

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
        self.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        stop_requested.cancel()
        for task in died:
            task.result()  # re-raises the task's error
            raise RuntimeError(f"task {task.get_name()} ended without being asked to stop")


def is_outage(error: BaseException) -> bool:
    """Postgres or Kafka away: waited out, never the end of the process."""
    return is_transient_database_error(error) or is_transient_kafka_error(error)


def is_transient_kafka_error(error: BaseException) -> bool:
    """A broker away or slow to answer, as aiokafka says it (retriable errors, timeouts)."""
    if isinstance(error, KafkaConnectionError | KafkaTimeoutError):
        return True
    return isinstance(error, KafkaError) and bool(getattr(error, "retriable", False))


async def _connect_database(settings: Settings, pool_size: int) -> Repository:
    backoff = Backoff(settings.retry_initial_seconds, settings.retry_max_seconds)
    url = settings.database_url.get_secret_value()
    answers = DatabaseAnswers(lambda: database_answers(url))

    async def wait(error: Exception) -> None:
        # No `stopping` here: _unless_stopped cancels this wait when the worker stops.
        log.warning("startup.waiting", service="postgres", **error_fields(error))
        await wait_to_retry(answers, backoff, asyncio.Event(), task="startup")

    def retriable(error: Exception) -> bool:
        return database_refusal(error) is None and is_transient_database_error(error)

    try:
        connect = functools.partial(
            Repository.connect,
            url,
            pool_size,
            statement_cache_size=settings.database_statement_cache_size,
        )
        return await retry(connect, retriable=retriable, wait=wait)
    except Exception as error:
        reason = database_refusal(error)
        if reason is None:
            raise
        log.error("database.access_refused", error=type(error).__name__, reason=reason)
        raise DatabaseAccessRefused(reason) from None


def _serve_health_or_refuse(
    settings: Settings, liveness: Liveness, readiness: Readiness
) -> HealthServer:
    """The /metrics, /livez and /readyz server, or PortUnavailable naming the port."""
    try:
        return serve_health(
            settings.metrics_port, health_app(liveness, readiness), str(settings.metrics_host)
        )
    except OSError as error:
        raise PortUnavailable(
            f"cannot listen on {settings.metrics_host} port {settings.metrics_port} "
            f"(METRICS_PORT, METRICS_HOST): {connection_reason(error)}"
        ) from None


async def _check_database_role(repository: Repository, settings: Settings) -> None:
    """A superuser connection is a weak setting (worker/weak_settings.py)."""
    [row] = await repository.fetch("connected_as_superuser")
    enforce(role_weaknesses(bool(row["rolsuper"])), strict=settings.strict_security)


def install_signal_handlers(worker: Worker) -> None:
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, worker.stop)

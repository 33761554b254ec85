"""Creates the aiokafka clients with the shared connection and security options."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import collect_hosts, create_conn
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import (
    InconsistentGroupProtocolError,
    KafkaConnectionError,
    KafkaError,
    TopicAlreadyExistsError,
)

from worker.failures import kafka_unreachable
from worker.ingest.console_catch_up import messages_behind
from worker.kafka.partitions import AgentTopicsNotCoPartitioned, co_partitioned
from worker.kafka.refusals import KafkaAccessRefused, refusal_message
from worker.retry import Backoff, retry
from worker.settings import Settings

log = structlog.get_logger(__name__)
T = TypeVar("T")
AGENT_TOPIC_CONFIG = {"message.timestamp.type": "LogAppendTime"}
DIAGNOSIS_TIMEOUT_SECONDS = 10.0
# The most one produce request may carry (aiokafka's default, said out loud): a dead letter
# larger than this, with its headers, is written truncated (worker/ingest/dead_letters.py).
PRODUCER_MAX_REQUEST_BYTES = 1_048_576
# What read_until_end (the DLQ tools, reconcile) reads ahead.
READ_FETCH_PARTITION_BYTES = 262_144
READ_FETCH_BYTES = 1_048_576
READ_BATCH_RECORDS = 100
# How long a stopping worker waits for its consumer to leave the group (stop_consumer).
CONSUMER_STOP_GRACE_SECONDS = 10.0
# How much longer than REBALANCE_FLUSH_TIMEOUT_SECONDS the group coordinator waits for a
# member to rejoin: the revocation's flush runs before the member rejoins.
REJOIN_MARGIN_SECONDS = 2.0
# aiokafka's default, said out loud: no request of a consumer, JoinGroup included, waits longer.
CONSUMER_REQUEST_TIMEOUT_MS = 40_000


def create_consumer(settings: Settings, group_id: str | None = None) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        **settings.kafka_client_options(),
        group_id=group_id or settings.consumer_group,
        client_id="license-worker",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        # Several batches of headroom without unbounded memory. A larger message (a topic
        # whose max.message.bytes is raised) still comes: the broker returns the first
        # batch of a fetch whole (KIP-74).
        max_partition_fetch_bytes=1_048_576,
        fetch_max_bytes=16_777_216,
        # Range: with the agent topics' equal partition counts it gives partition p of both
        # to the same member, which the last-seen precision needs (docs/ingestion.md). One
        # assignor only: aiokafka 0.14 sends a JoinGroup per configured assignor, each later
        # one with a longer protocol list, which the coordinator takes as changed metadata and
        # answers with another rebalance; under load a group of such members never settled
        # (the fault run: 1,800 generations in 5 minutes; tests/integration/test_group_joins.py).
        partition_assignment_strategy=(RangePartitionAssignor,),
        # Longer than the revocation's flush: a member whose flush outlasted it (Postgres
        # restarting) was dropped from the group, rejoined, and started another rebalance.
        # Not much longer: a member killed while its JoinGroup waits is dropped only after
        # this, and every member waits with it. A JoinGroup's answer must come within the
        # request timeout (settings cap the flush timeout at 30 s: 32 < 40 s).
        rebalance_timeout_ms=int(
            (settings.rebalance_flush_timeout_seconds + REJOIN_MARGIN_SECONDS) * 1000
        ),
        request_timeout_ms=CONSUMER_REQUEST_TIMEOUT_MS,
    )


async def stop_consumer(consumer: AIOKafkaConsumer, stopping: asyncio.Event, group: str) -> None:
    """Stops `consumer`, leaving its group. aiokafka lets a join in progress finish first,
    and a join waits for the group's slowest member (up to its rebalance timeout). While
    the worker is stopping, that wait is cut at CONSUMER_STOP_GRACE_SECONDS: the offsets of
    every finished batch are committed by then, and the group drops this member after its
    session timeout. A consumer recreated while the worker runs waits the join out."""
    closing = asyncio.ensure_future(consumer.stop())
    stop_requested = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({closing, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop_requested.cancel()
    done, _ = await asyncio.wait({closing}, timeout=CONSUMER_STOP_GRACE_SECONDS)
    if done:
        closing.result()
        return
    closing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await closing
    log.warning(
        "kafka.consumer_stop_timed_out", group=group, waited_seconds=CONSUMER_STOP_GRACE_SECONDS
    )


def create_producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        **settings.kafka_client_options(),
        client_id="license-worker",
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_request_size=PRODUCER_MAX_REQUEST_BYTES,
    )


async def start_with_retry(
    name: str, start: Callable[[], Awaitable[T]], settings: Settings, attempts: int | None = None
) -> T:
    """Waits for Kafka to be reachable at start-up instead of crash-looping, but raises
    KafkaAccessRefused at once when Kafka refuses the credentials or the certificate."""
    backoff = Backoff(settings.retry_initial_seconds, settings.retry_max_seconds)

    async def wait(error: Exception) -> None:
        cause = await diagnose_connection(name, settings)
        if attempts is not None and backoff.attempts + 1 >= attempts:
            raise kafka_unreachable(settings.kafka_bootstrap_servers, cause or error) from error
        delay = backoff.next_delay()
        log.warning(
            "startup.waiting",
            service=name,
            error=type(error).__name__,
            cause=type(cause).__name__ if cause else None,
            retry_in=round(delay, 2),
        )
        await asyncio.sleep(delay)

    def unreachable(error: Exception) -> bool:
        return isinstance(error, KafkaConnectionError | OSError)

    try:
        return await retry(start, retriable=unreachable, wait=wait)
    except InconsistentGroupProtocolError:
        log.error(
            "kafka.group_protocol_mismatch",
            service=name,
            hint="members of a release before 2026-12-03 (round-robin assignor) are in the "
            "group: stop them before starting this release (docs/operations.md, Upgrades)",
        )
        raise


async def start_once(name: str, start: Callable[[], Awaitable[T]], settings: Settings) -> T:
    """Starts a client of a one-shot command: no waiting, but a refusal is told as such."""
    return await start_with_retry(name, start, settings, attempts=1)


async def diagnose_connection(name: str, settings: Settings) -> BaseException | None:
    """Connects to each bootstrap server directly: aiokafka's start() reports every failure
    as "Unable to bootstrap" and drops the cause. Raises KafkaAccessRefused if a server
    refused us; otherwise returns the last connection error (None if a server answered)."""
    options = settings.kafka_client_options()
    last_error: BaseException | None = None
    for host, port, _ in collect_hosts(options.pop("bootstrap_servers"), randomize=False):
        address = f"{host}:{port}"
        try:
            async with asyncio.timeout(DIAGNOSIS_TIMEOUT_SECONDS):
                connection = await create_conn(host, port, client_id="license-worker", **options)
        except (OSError, KafkaError, TimeoutError) as error:
            reason = refusal_message(error, settings, address)
            if reason is not None:
                log.error(
                    "kafka.access_refused",
                    service=name,
                    address=address,
                    error=type(error).__name__,
                    reason=reason,
                )
                raise KafkaAccessRefused(reason) from error
            last_error = error
        else:
            connection.close()
            return None
    return last_error


async def ensure_topics(settings: Settings, partitions: int, replication_factor: int) -> list[str]:
    """Creates the service's topics that do not exist yet; returns the names created."""
    admin = AIOKafkaAdminClient(**settings.kafka_client_options())
    try:
        await start_once("kafka-admin", admin.start, settings)
        wanted = [
            *settings.agent_topics,
            settings.dlq_topic,
            settings.license_events_topic,
            settings.admin_topic,
        ]
        existing = set(await admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        planned = await partition_counts(admin, list(settings.agent_topics))
        planned |= {name: partitions for name in settings.agent_topics if name in missing}
        if (problem := co_partitioned(planned)) is not None:
            raise AgentTopicsNotCoPartitioned(problem)
        created = []
        for name in missing:
            # Agent topics take the broker's clock: lag in seconds and the sweeper's
            # watermark must not depend on agent clocks.
            configs = AGENT_TOPIC_CONFIG if name in settings.agent_topics else {}
            if name == settings.dlq_topic:
                configs = dlq_topic_config(settings)
            try:
                await admin.create_topics(
                    [
                        NewTopic(
                            name,
                            num_partitions=partitions,
                            replication_factor=replication_factor,
                            topic_configs=configs,
                        )
                    ]
                )
                created.append(name)
            except TopicAlreadyExistsError:
                pass
            except KafkaError as error:
                log.error("kafka.topic_create_failed", topic=name, error=type(error).__name__)
                raise
        return created
    finally:
        await admin.close()


def dlq_topic_config(settings: Settings) -> dict[str, str]:
    """The DLQ keeps raw agent messages (personal data the purge and erasure cannot reach):
    it deletes them after DLQ_RETENTION_DAYS."""
    retention_ms = round(settings.dlq_retention_days * 24 * 3600 * 1000)
    return {"retention.ms": str(retention_ms), "cleanup.policy": "delete"}


class PartitionEnds:
    """The end offsets of the agent topics' partitions, for the sweeper's lag check."""

    def __init__(self, settings: Settings) -> None:
        self._topics = list(settings.agent_topics)
        self._admin = AIOKafkaAdminClient(**settings.kafka_client_options())
        self._consumer = AIOKafkaConsumer(
            **settings.kafka_client_options(),
            client_id="license-worker-lag",
            enable_auto_commit=False,
        )

    async def start(self) -> None:
        await self._admin.start()
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()
        await self._admin.close()

    async def __call__(self) -> dict[tuple[str, int], int]:
        partitions = await describe_partitions(self._admin, self._topics)
        if not partitions:
            return {}
        ends = await self._consumer.end_offsets(partitions)
        return {(tp.topic, tp.partition): offset for tp, offset in ends.items()}

    async def group_behind(self, group: str, topic: str) -> int:
        """How many messages of `topic` `group` has not committed yet (0: a topic that
        does not exist). Kafka errors are raised."""
        partitions = await describe_partitions(self._admin, [topic])
        if not partitions:
            return 0
        ends = await self._consumer.end_offsets(partitions)
        beginnings = await self._consumer.beginning_offsets(partitions)
        committed = await self._admin.list_consumer_group_offsets(group, partitions=partitions)
        return messages_behind(
            ends, beginnings, {tp: meta.offset for tp, meta in committed.items()}
        )


async def read_topic(settings: Settings, topic: str, idle_seconds: float) -> list[bytes]:
    """Every value of `topic` from the beginning, until nothing new came for `idle_seconds`."""
    consumer = AIOKafkaConsumer(
        topic,
        **settings.kafka_client_options(),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    values: list[bytes] = []
    try:
        await start_once("kafka-consumer", consumer.start, settings)
        while batch := await consumer.getmany(timeout_ms=int(idle_seconds * 1000)):
            values.extend(
                record.value for records in batch.values() for record in records if record.value
            )
    finally:
        await consumer.stop()
    return values


async def read_until_end(settings: Settings, topic: str) -> AsyncIterator[Any]:
    """Every record of every partition of `topic`, from the beginning up to its end when the
    read started, yielded as read: memory stays bounded by the fetch sizes, whatever the
    topic holds. No consumer group: reading changes nothing."""
    admin = AIOKafkaAdminClient(**settings.kafka_client_options())
    try:
        await start_once("kafka-admin", admin.start, settings)
        partitions = await describe_partitions(admin, [topic])
    finally:
        await admin.close()
    if not partitions:
        return
    consumer = AIOKafkaConsumer(
        **settings.kafka_client_options(),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        # The records read ahead stay within a few MiB however large the topic is (its
        # largest message still comes whole: KIP-74).
        max_partition_fetch_bytes=READ_FETCH_PARTITION_BYTES,
        fetch_max_bytes=READ_FETCH_BYTES,
    )
    try:
        await start_once("kafka-consumer", consumer.start, settings)
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        remaining = {tp for tp in partitions if ends[tp] > await consumer.position(tp)}
        while remaining:
            batch = await consumer.getmany(
                *remaining, timeout_ms=1000, max_records=READ_BATCH_RECORDS
            )
            for tp, records in batch.items():
                for record in records:
                    if record.offset < ends[tp]:
                        yield record
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()


async def cluster_answers(settings: Settings) -> None:
    """Raises unless the brokers answer a metadata request and the agent topics that exist
    have the same number of partitions."""
    admin = AIOKafkaAdminClient(**settings.kafka_client_options(), request_timeout_ms=5000)
    try:
        await start_once("kafka-admin", admin.start, settings)
        await admin.describe_cluster()
        counts = await partition_counts(admin, list(settings.agent_topics))
    finally:
        await admin.close()
    if (problem := co_partitioned(counts)) is not None:
        raise AgentTopicsNotCoPartitioned(problem)


async def partition_counts(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int]:
    """Partitions per topic, of the topics that exist. Only those are described: a
    metadata request for a missing topic makes a broker that auto-creates topics create it
    with its default count."""
    existing = set(await admin.list_topics())
    counts: dict[str, int] = {}
    for partition in await describe_partitions(admin, [t for t in topics if t in existing]):
        counts[partition.topic] = counts.get(partition.topic, 0) + 1
    return counts


async def describe_partitions(
    admin: AIOKafkaAdminClient, topics: list[str]
) -> list[TopicPartition]:
    """The partitions of the topics that exist (a missing topic has none)."""
    return sorted(
        (
            TopicPartition(topic["topic"], partition["partition"])
            for topic in await admin.describe_topics(topics)
            if topic["error_code"] == 0
            for partition in topic["partitions"]
        ),
        key=lambda tp: (tp.topic, tp.partition),
    )

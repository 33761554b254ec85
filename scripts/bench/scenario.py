"""Where one measurement runs: the services, fresh topics, group and database per scenario,
and producing a workload into them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from scripts.bench import log
from scripts.bench.code_under_test import CODE_DIR, UnderTest
from scripts.bench.shapes import Messages, Workload


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

    def worker_settings(self, services: Services, group: str) -> Any:
        # The environment (e.g. BATCH_MAX_RECORDS) still applies to what is not set here,
        # exactly as it does for the worker subprocess.
        return UnderTest.Settings(
            kafka_bootstrap_servers=services.kafka_bootstrap_servers,
            database_url=self.database_url,
            consumer_group=group,
            # The benchmark's fleet has no console (ignored by versions without the setting).
            unknown_customers="admit",
            **self.topics,
        )

    def worker_environment(self, services: Services) -> dict[str, str]:
        environment = dict(os.environ)
        environment.update(
            {
                "KAFKA_BOOTSTRAP_SERVERS": services.kafka_bootstrap_servers,
                "DATABASE_URL": self.database_url,
                "CONSUMER_GROUP": self.worker_group,
                "UNKNOWN_CUSTOMERS": "admit",
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
    def peer_group(self) -> str:
        """The group of the minimal pipeline (scripts/bench/peer.py)."""
        return f"bench-peer-{self.suffix}"

    @property
    def stage_groups(self) -> tuple[str, str]:
        """The groups that read for the decode limit (a2) and the write limit (a3)."""
        return (f"bench-decode-{self.suffix}", f"bench-write-{self.suffix}")


async def create_scenario(services: Services, partitions: int) -> Scenario:
    suffix = uuid.uuid4().hex[:10]
    # The worker's topic settings (heartbeat_topic, ...), named bench.heartbeat.<suffix>, ...
    kinds = ("heartbeat", "lifecycle", "dlq", "license_events")
    topics = {f"{kind}_topic": f"bench.{kind.replace('_', '-')}.{suffix}" for kind in kinds}
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
                [
                    scenario.worker_group,
                    scenario.reader_group,
                    scenario.peer_group,
                    *scenario.stage_groups,
                ]
            )
    except KafkaError as error:
        log(f"could not delete topics of {scenario.suffix}: {error!r}")
    finally:
        await admin.close()
    await drop_database(services, scenario.database_name)


def bulk_producer(bootstrap: str) -> AIOKafkaProducer:
    # Default 16 KiB batches with a short linger: a few dozen messages per record batch,
    # as a broker sees them from many agents through a gateway. Not tuned for speed.
    return AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=10)


async def produce_workload(services: Services, scenario: Scenario, workload: Workload) -> float:
    """Produces the timed messages (after any stored beforehand); returns the seconds taken."""
    return await produce_messages(
        services,
        scenario,
        workload.lifecycle,
        workload.heartbeats,
        len(workload.stored_beforehand) + workload.total,
    )


async def produce_messages(
    services: Services,
    scenario: Scenario,
    lifecycle: Messages,
    heartbeats: Messages,
    expected_end: int,
) -> float:
    """Produces lifecycle then heartbeat messages and checks that the topics then hold
    `expected_end` messages in all."""
    producer = bulk_producer(services.kafka_bootstrap_servers)
    await producer.start()
    started = time.perf_counter()
    try:
        lifecycle_topic = scenario.topics["lifecycle_topic"]
        heartbeat_topic = scenario.topics["heartbeat_topic"]
        for key, value in lifecycle:
            await producer.send(lifecycle_topic, value, key=key)
        for key, value in heartbeats:
            await producer.send(heartbeat_topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()
    elapsed = time.perf_counter() - started
    ends = await end_offsets(services, scenario)
    if sum(ends.values()) != expected_end:
        raise RuntimeError(
            f"expected {expected_end} messages in the topics but they hold {sum(ends.values())}"
        )
    return elapsed


async def commit_offsets(
    services: Services, group: str, offsets: dict[tuple[str, int], int]
) -> None:
    """Commits `offsets` for `group` without joining it: a consumer of that group then starts
    there (used to skip what was stored beforehand)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=services.kafka_bootstrap_servers,
        group_id=group,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        partitions = {
            TopicPartition(topic, partition): offset
            for (topic, partition), offset in offsets.items()
        }
        consumer.assign(list(partitions))
        await consumer.commit(partitions)
    finally:
        await consumer.stop()


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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])

"""What a fault-suite run is set up with: its own database (roles, migrations), its own
topics, the replicas' settings, and a producer that can send the oversized message."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.support import Services, migrate_database, pseudonym_key_file_for_tests
from worker.kafka.clients import AGENT_TOPIC_CONFIG
from worker.settings import Settings

# The oversized poison message is about 1 MB: the agent topics must accept it (the DLQ
# topic keeps the broker's default, as in production).
AGENT_TOPIC_MAX_BYTES = "2097152"
PARTITIONS = 6


async def create_database(services: Services) -> str:
    url = await services.create_database("license_faults")
    await services.set_up_roles(url, set_passwords=True)
    await migrate_database(services.owner_url(url))
    await services.set_up_roles(url)  # the migrated tables' grants
    return url


async def create_topics(bootstrap: str) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:10]
    names = {
        "heartbeat_topic": f"faults.heartbeat.{suffix}",
        "lifecycle_topic": f"faults.lifecycle.{suffix}",
        "dlq_topic": f"faults.dlq.{suffix}",
        "license_events_topic": f"faults.license.{suffix}",
        "admin_topic": f"faults.admin.{suffix}",
    }
    agent_config = {**AGENT_TOPIC_CONFIG, "max.message.bytes": AGENT_TOPIC_MAX_BYTES}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(
                    name,
                    num_partitions=PARTITIONS,
                    replication_factor=1,
                    topic_configs=agent_config
                    if key in ("heartbeat_topic", "lifecycle_topic")
                    else {},
                )
                for key, name in names.items()
            ]
        )
    finally:
        await admin.close()
    return {
        **names,
        "consumer_group": f"faults-{suffix}",
        "admin_consumer_group": f"faults-admin-{suffix}",
    }


def replica_settings(
    bootstrap: str, database_url: str, topics: dict[str, str], batch_max_records: int
) -> Settings:
    # Production defaults for retries (the recovery times are part of the figures), a
    # sweeper pass every few seconds, smaller batches so that faults land between them.
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": bootstrap,
        "database_url": database_url,
        "batch_max_records": batch_max_records,
        "sweep_interval_seconds": 5.0,
        "monitor_interval_seconds": 2.0,
        # A short settle window: allocations withdrawn or re-dated within it under faults,
        # published soon enough for the suite's final relay pass.
        "allocation_settle_seconds": 1.0,
        # Every heartbeat written: the invariants compare each stored last seen with the
        # newest signal, and releases with the exact window. (The last-seen precision has
        # its own tests: tests/integration/test_last_seen_precision.py.)
        "last_seen_precision_seconds": 0,
        "pseudonym_key_file": pseudonym_key_file_for_tests(),
        **topics,
    }
    return Settings(**values)


@contextlib.asynccontextmanager
async def producer(bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_request_size=int(AGENT_TOPIC_MAX_BYTES),
        request_timeout_ms=60_000,
    )
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()

"""`create-topics` and `check` on real Kafka: the agent topics' partition count comes from
TOPIC_PARTITIONS (or --partitions), and topics that are not co-partitioned are refused."""

from __future__ import annotations

import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.support import Services, make_settings, run_cli, settings_environment

pytestmark = pytest.mark.acceptance


def fresh_names() -> dict[str, str]:
    suffix = uuid.uuid4().hex[:8]
    return {
        "heartbeat_topic": f"parts.heartbeat.{suffix}",
        "lifecycle_topic": f"parts.lifecycle.{suffix}",
        "dlq_topic": f"parts.dlq.{suffix}",
        "license_events_topic": f"parts.license.{suffix}",
        "admin_topic": f"parts.admin.{suffix}",
    }


async def partition_counts(services: Services, topics: list[str]) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=services.kafka_bootstrap_servers)
    await admin.start()
    try:  # describing a missing topic would auto-create it on the local broker
        existing = set(await admin.list_topics())
        described = await admin.describe_topics([t for t in topics if t in existing])
    finally:
        await admin.close()
    return {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0}


async def create_topic(services: Services, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=services.kafka_bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


def environment(services: Services, database_url: str, names: dict[str, str]) -> dict[str, str]:
    return settings_environment(make_settings(services, database_url, names))


async def test_create_topics_takes_the_partition_count_from_the_setting(
    services: Services, database_url: str
) -> None:
    names = fresh_names()
    created = run_cli(
        {**environment(services, database_url, names), "TOPIC_PARTITIONS": "3"}, "create-topics"
    )
    assert created.returncode == 0, created.stderr
    counts = await partition_counts(services, list(names.values()))
    assert counts == dict.fromkeys(names.values(), 3)


async def test_create_topics_refuses_to_create_an_agent_topic_of_another_count(
    services: Services, database_url: str
) -> None:
    names = fresh_names()
    await create_topic(services, names["heartbeat_topic"], 2)
    env = environment(services, database_url, names)

    refused = run_cli(env, "create-topics", "--partitions", "3")
    assert refused.returncode == 1, refused.stderr
    [line] = refused.stderr.strip().splitlines()
    assert f"{names['heartbeat_topic']} has 2, {names['lifecycle_topic']} has 3" in line
    assert await partition_counts(services, list(names.values())) == {names["heartbeat_topic"]: 2}

    created = run_cli(env, "create-topics", "--partitions", "2")
    assert created.returncode == 0, created.stderr
    counts = await partition_counts(services, [names["heartbeat_topic"], names["lifecycle_topic"]])
    assert set(counts.values()) == {2}


async def test_create_topics_and_check_refuse_existing_agent_topics_that_differ(
    services: Services, database_url: str
) -> None:
    names = fresh_names()
    await create_topic(services, names["heartbeat_topic"], 2)
    await create_topic(services, names["lifecycle_topic"], 4)
    env = environment(services, database_url, names)

    refused = run_cli(env, "create-topics", "--partitions", "2")
    assert refused.returncode == 1, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "must have the same number of partitions" in refused.stderr

    checked = run_cli(env, "check")
    assert checked.returncode == 1, checked.stdout
    assert f"{names['heartbeat_topic']} has 2, {names['lifecycle_topic']} has 4" in checked.stderr


async def test_check_passes_with_co_partitioned_agent_topics(
    services: Services, database_url: str
) -> None:
    names = fresh_names()
    env = environment(services, database_url, names)
    assert run_cli(env, "create-topics", "--partitions", "2").returncode == 0
    checked = run_cli(env, "check")
    assert checked.returncode == 0, checked.stderr

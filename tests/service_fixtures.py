"""Fixtures of the integration and acceptance tests (imported by their conftest.py): real
Kafka and real Postgres.

Where `KAFKA_BOOTSTRAP_SERVERS` and `DATABASE_URL` are set (CI, `make test`), they are used.
Otherwise a Docker engine, if one answers, starts both with testcontainers; otherwise
`deploy/local/services.sh` starts them from the Kafka jars and the Postgres binaries.
Every test gets its own database (copied from a migrated template) and its own topics.
The template is migrated by the owner role, and `database_url` connects as the worker role:
every test runs the worker with least privilege (sql/roles/create_roles.sql). A test that
needs more asks `services.owner_url(...)` or `services.superuser_url(...)` for it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support import (
    SecureKafka,
    Services,
    create_topics,
    local_services,
    migrate_database,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def _services_from_environment() -> Services | None:
    kafka, database = os.environ.get("KAFKA_BOOTSTRAP_SERVERS"), os.environ.get("DATABASE_URL")
    pgbouncer = os.environ.get("PGBOUNCER_DATABASE_URL") or None
    if kafka and database:
        # Set by `.ci/run` and `make test`: lets the outage tests stop and start a service.
        state_dir = os.environ.get("LOCAL_SERVICES_DIR")
        if not state_dir:
            return Services(kafka, database, pgbouncer_url=pgbouncer)
        path = Path(state_dir)
        return Services(
            kafka,
            database,
            state_dir=path,
            secure=SecureKafka.from_state_dir(path),
            pgbouncer_url=pgbouncer,
        )
    return None


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env().ping()
    except Exception:
        return False
    return True


def _start_with_testcontainers() -> Iterator[Services]:
    from testcontainers.kafka import KafkaContainer
    from testcontainers.postgres import PostgresContainer

    with (
        KafkaContainer("apache/kafka:4.1.1").with_kraft() as kafka,
        PostgresContainer("postgres:15", driver=None) as postgres,
    ):
        yield Services(kafka.get_bootstrap_server(), postgres.get_connection_url())


def _start_with_local_script(state_dir: Path) -> Iterator[Services]:
    with local_services(state_dir) as services:
        yield services


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    from_environment = _services_from_environment()
    if from_environment is not None:
        yield from_environment
    elif _docker_answers():
        yield from _start_with_testcontainers()
    else:
        yield from _start_with_local_script(tmp_path_factory.mktemp("services"))


@pytest.fixture(scope="session")
async def template_database(services: Services) -> str:
    """A database with the service's roles and every migration applied (by the owner role),
    copied for each test."""
    url = await services.create_database("license_template")
    await services.set_up_roles(url, set_passwords=True)
    await migrate_database(services.owner_url(url))
    return url.rsplit("/", 1)[-1]


@pytest.fixture
async def database_url(services: Services, template_database: str) -> AsyncIterator[str]:
    """A fresh migrated database, as the worker role sees it."""
    url = await services.create_database("license_test", template=template_database)
    # A copied database keeps the tables' grants but not the database's own (CONNECT).
    await services.set_up_roles(url)
    yield services.worker_url(url)
    await services.drop_database(url)


def fresh_topic_names() -> dict[str, str]:
    """Topic and consumer group settings under a random suffix, unused by any other test."""
    suffix = uuid.uuid4().hex[:10]
    return {
        "heartbeat_topic": f"agent.heartbeat.{suffix}",
        "lifecycle_topic": f"agent.lifecycle.{suffix}",
        "dlq_topic": f"agent.events.dlq.{suffix}",
        "license_events_topic": f"license.events.{suffix}",
        "admin_topic": f"tenant.admin.{suffix}",
        "consumer_group": f"license-telemetry-{suffix}",
        "admin_consumer_group": f"license-telemetry-admin-{suffix}",
    }


@pytest.fixture
async def topics(services: Services) -> dict[str, str]:
    """Fresh topic names for one test, so tests never read each other's messages."""
    names = fresh_topic_names()
    await create_topics(services.kafka_bootstrap_servers, names, partitions=4)
    return names

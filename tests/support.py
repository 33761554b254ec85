"""Helpers for tests that talk to the real Kafka and Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError
from pydantic import SecretStr

from worker.clock import Clock
from worker.db.repository import Repository
from worker.db.roles import DatabaseRoles, scram_sha256_verifier
from worker.db.sql_files import load_migrations
from worker.kafka.clients import AGENT_TOPIC_CONFIG
from worker.service import Worker
from worker.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "worker.cli"]


def run_cli(
    environment: dict[str, str], *arguments: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`license-worker ARGUMENTS` as a subprocess, from the repository, output captured."""
    return subprocess.run(
        [*CLI, *arguments],
        env=environment,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


AGENT_TOPIC_KEYS = ("heartbeat_topic", "lifecycle_topic")

# The tests use the roles an operator creates (`license-worker create-roles`): migrations run
# as the owner, the worker and the tests' queries as the worker role. The passwords are
# fixed, so test sessions sharing a cluster never lock each other out.
ROLES = DatabaseRoles()
OWNER_PASSWORD = "owner-test-password"
WORKER_PASSWORD = "worker-test-password"
REPORTER_PASSWORD = "reporter-test-password"

# Stands in for any row Postgres refuses as data (not an outage): a trigger that rejects one
# device id with an SQL data error.
POISON_TRIGGER = """
CREATE FUNCTION reject_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.device_id = 'poison' THEN
        RAISE EXCEPTION 'poison device' USING ERRCODE = '22023';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER reject_poison BEFORE INSERT OR UPDATE ON devices
    FOR EACH ROW EXECUTE FUNCTION reject_poison();
"""


@dataclass(frozen=True)
class SecureKafka:
    """The SASL_SSL listener of the same broker (deploy/local/services.sh writes it to
    STATE_DIR/env-secure): the same topics, reached over TLS with a SCRAM user."""

    settings: Mapping[str, str]

    @classmethod
    def from_state_dir(cls, state_dir: Path) -> SecureKafka | None:
        path = state_dir / "env-secure"
        if not path.exists():
            return None
        lines = path.read_text().splitlines()
        values = dict(line.removeprefix("export ").split("=", 1) for line in lines if line)
        return cls({name.lower(): value for name, value in values.items()})

    def overrides(self, **changes: str) -> dict[str, str]:
        """Settings values that point a worker at this listener (for make_settings)."""
        return {**self.settings, **changes}


@dataclass(frozen=True)
class Services:
    kafka_bootstrap_servers: str
    database_url: str  # a superuser's
    state_dir: Path | None = None
    # Only where deploy/local/services.sh runs the broker.
    secure: SecureKafka | None = None
    # PgBouncer in transaction mode in front of that Postgres (a superuser's URL through it),
    # where deploy/local/services.sh runs it: PGBOUNCER_DATABASE_URL.
    pgbouncer_url: str | None = None

    def through_pgbouncer(self, url: str) -> str:
        """`url` (its user, password and database) through PgBouncer. Where none runs, the
        test is skipped, or fails under CI=true (CI installs pgbouncer)."""
        if self.pgbouncer_url is None:
            reason = (
                "PgBouncer is not running (apt-get install pgbouncer; deploy/local/services.sh)"
            )
            if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
                pytest.fail(f"{reason}; CI must run this check")
            pytest.skip(reason)
        bouncer = urlsplit(self.pgbouncer_url)
        parts = urlsplit(url)
        credentials = parts.netloc.rpartition("@")[0]
        return urlunsplit(
            parts._replace(netloc=f"{credentials}@{bouncer.netloc.rpartition('@')[2]}")
        )

    def database_url_for(self, name: str) -> str:
        parts = urlsplit(self.database_url)
        return urlunsplit(parts._replace(path=f"/{name}"))

    def admin_url(self) -> str:
        return self.database_url_for("postgres")

    def superuser_url(self, url: str) -> str:
        """`url`'s database as the superuser (schema changes the migrations do not make)."""
        return self.database_url_for(urlsplit(url).path.lstrip("/"))

    def owner_url(self, url: str) -> str:
        return url_as(self.superuser_url(url), ROLES.owner, OWNER_PASSWORD)

    def worker_url(self, url: str) -> str:
        return url_as(self.superuser_url(url), ROLES.worker, WORKER_PASSWORD)

    def reporter_url(self, url: str) -> str:
        return url_as(self.superuser_url(url), ROLES.reporter, REPORTER_PASSWORD)

    async def set_up_roles(self, url: str, *, set_passwords: bool = False) -> None:
        """What `license-worker create-roles` does, in `url`'s database, as the superuser."""
        verifiers = [
            scram_sha256_verifier(password) if set_passwords else ""
            for password in (OWNER_PASSWORD, WORKER_PASSWORD, REPORTER_PASSWORD)
        ]
        repository = await Repository.connect(self.superuser_url(url), 1)
        try:
            await repository.set_up_roles(ROLES, *verifiers)
        finally:
            await repository.close()

    async def create_database(self, prefix: str, template: str | None = None) -> str:
        """A new, uniquely named database (a copy of `template` if given); returns its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        copy = f' TEMPLATE "{template}"' if template else ""
        await self._admin(f'CREATE DATABASE "{name}"{copy}')
        return self.database_url_for(name)

    async def drop_database(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def _admin(self, statement: str) -> None:
        admin = await asyncpg.connect(self.admin_url())
        try:
            await admin.execute(statement)
        finally:
            await admin.close()

    def services_script(self, command: str) -> None:
        """Stops or starts one local service (only where deploy/local/services.sh runs them)."""
        if self.state_dir is None:
            import pytest

            pytest.skip("needs services started by deploy/local/services.sh")
        script = REPO_ROOT / "deploy" / "local" / "services.sh"
        subprocess.run(
            ["bash", str(script), command, str(self.state_dir)],
            check=True,
            timeout=180,
            capture_output=True,
        )


SERVICES_SCRIPT = REPO_ROOT / "deploy" / "local" / "services.sh"


@contextlib.contextmanager
def local_services(state_dir: Path, *, clean: bool = False) -> Iterator[Services]:
    """Kafka and Postgres started by deploy/local/services.sh in `state_dir`, stopped (and
    with `clean`, deleted) when the block ends."""
    output = subprocess.run(
        ["bash", str(SERVICES_SCRIPT), "start", str(state_dir)],
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    ).stdout
    values = dict(
        line.removeprefix("export ").split("=", 1)
        for line in output.splitlines()
        if line.startswith("export ")
    )
    try:
        yield Services(
            values["KAFKA_BOOTSTRAP_SERVERS"],
            values["DATABASE_URL"],
            state_dir=state_dir,
            secure=SecureKafka.from_state_dir(state_dir),
            pgbouncer_url=values.get("PGBOUNCER_DATABASE_URL"),
        )
    finally:
        stop = ["bash", str(SERVICES_SCRIPT), "stop", *(["--clean"] if clean else [])]
        subprocess.run([*stop, str(state_dir)], check=False, timeout=300)


def url_as(url: str, user: str, password: str | None) -> str:
    """`url` with other credentials (no password: none in the URL)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    credentials = user if password is None else f"{user}:{password}"
    return urlunsplit(parts._replace(netloc=f"{credentials}@{host}"))


async def migrate_database(database_url: str) -> None:
    repository = await Repository.connect(database_url, 1)
    try:
        await repository.apply_migrations(load_migrations())
    finally:
        await repository.close()


async def create_topics(bootstrap: str, names: Mapping[str, str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(
                    names[key],
                    num_partitions=partitions,
                    replication_factor=1,
                    topic_configs=AGENT_TOPIC_CONFIG if key in AGENT_TOPIC_KEYS else {},
                )
                for key in (
                    "heartbeat_topic",
                    "lifecycle_topic",
                    "dlq_topic",
                    "license_events_topic",
                    "admin_topic",
                )
            ]
        )
    finally:
        await admin.close()


SOURCE_TOPIC_LIMIT = 3_000_000


async def create_topics_with_limits(
    services: Services, dlq_limit: int | None = None, license_events_limit: int | None = None
) -> dict[str, str]:
    """Fresh topics (and consumer groups) for one test whose agent topics take messages of
    up to SOURCE_TOPIC_LIMIT bytes; the DLQ's and license events' `max.message.bytes` are
    the limits given (the broker's default otherwise)."""
    suffix = uuid.uuid4().hex[:10]
    names = {
        "heartbeat_topic": f"agent.heartbeat.big.{suffix}",
        "lifecycle_topic": f"agent.lifecycle.big.{suffix}",
        "dlq_topic": f"agent.events.dlq.big.{suffix}",
        "license_events_topic": f"license.events.big.{suffix}",
        "admin_topic": f"tenant.admin.big.{suffix}",
        "consumer_group": f"license-telemetry-big-{suffix}",
        "admin_consumer_group": f"license-telemetry-admin-big-{suffix}",
    }
    source = {**AGENT_TOPIC_CONFIG, "max.message.bytes": str(SOURCE_TOPIC_LIMIT)}
    configs: dict[str, dict[str, str]] = {
        "heartbeat_topic": source,
        "lifecycle_topic": source,
        "dlq_topic": _message_limit(dlq_limit),
        "license_events_topic": _message_limit(license_events_limit),
        "admin_topic": {},
    }
    admin = AIOKafkaAdminClient(bootstrap_servers=services.kafka_bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(names[key], 4, 1, topic_configs=config) for key, config in configs.items()]
        )
    finally:
        await admin.close()
    return names


def _message_limit(limit: int | None) -> dict[str, str]:
    return {} if limit is None else {"max.message.bytes": str(limit)}


async def set_message_limit(services: Services, topic: str, limit: int) -> None:
    """Sets a topic's `max.message.bytes` (its only setting afterwards: AlterConfigs
    replaces a topic's whole configuration)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=services.kafka_bootstrap_servers)
    await admin.start()
    try:
        resource = ConfigResource(ConfigResourceType.TOPIC, topic, _message_limit(limit))
        await admin.alter_configs([resource])
    finally:
        await admin.close()


async def produce_to_partitions(
    services: Services, topic: str, messages: dict[int, list[tuple[bytes, bytes]]]
) -> int:
    """Produces each partition's messages in order, up to SOURCE_TOPIC_LIMIT bytes each."""
    producer = AIOKafkaProducer(
        bootstrap_servers=services.kafka_bootstrap_servers,
        acks="all",
        max_request_size=SOURCE_TOPIC_LIMIT + 100_000,
    )
    await producer.start()
    count = 0
    try:
        for partition, partition_messages in messages.items():
            for key, value in partition_messages:
                await producer.send_and_wait(topic, value=value, key=key, partition=partition)
                count += 1
    finally:
        await producer.stop()
    return count


@functools.cache
def pseudonym_key_file_for_tests() -> Path:
    """A random pseudonym key (32 bytes, hexadecimal) in a private file, as an operator
    creates it with `openssl rand -hex 32`: one for the whole test run."""
    directory = Path(tempfile.mkdtemp(prefix="license-test-key-"))
    path = directory / "pseudonym.key"
    path.touch(mode=0o600)
    path.write_text(secrets.token_hex(32) + "\n", encoding="utf-8")
    return path


def make_settings(
    services: Services, database_url: str, topics: Mapping[str, str], **overrides: Any
) -> Settings:
    key: dict[str, Any] = {"pseudonym_key_file": pseudonym_key_file_for_tests()}
    if "pseudonym_key" in overrides or "pseudonym_key_file" in overrides:
        key = {"pseudonym_key_file": None}
    values: dict[str, Any] = {
        **key,
        "kafka_bootstrap_servers": services.kafka_bootstrap_servers,
        "database_url": database_url,
        "batch_max_wait_ms": 100,
        # Allocations published at once, as these tests expect; the settle window has tests
        # of its own that set it (test_settled_allocations.py).
        "allocation_settle_seconds": 0,
        # Tests run workers on clocks months ahead and then read the outbox: the relay keeps
        # what it published unless a test of the retention sets one (test_outbox_pruning.py).
        "outbox_retention_days": 3650,
        "retry_initial_seconds": 0.05,
        "retry_max_seconds": 1.0,
        # Most tests send agent signals without creating their customers on the console
        # topic first: today's behaviour. Tests of the refusal ask for "refuse".
        "unknown_customers": "admit",
        # Every heartbeat written and licenses released exactly at the window, as these
        # tests expect; the last-seen precision has tests of its own that set it
        # (test_last_seen_precision.py).
        "last_seen_precision_seconds": 0,
        **topics,
        **overrides,
    }
    return Settings(**values)


def settings_environment(settings: Settings) -> dict[str, str]:
    """The environment variables that reproduce `settings` in a subprocess."""
    environment = dict(os.environ)
    for name, value in settings.model_dump(mode="json").items():
        # A *_FILE variable's secret is already in the value it fed (DATABASE_URL).
        if value is not None and not name.endswith("_file"):
            environment[name.upper()] = str(value)
    for name in Settings.model_fields:  # secrets are masked in the dump above
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            environment[name.upper()] = value.get_secret_value()
        elif name.endswith("_file"):
            environment.pop(name.upper(), None)  # its secret is in the value it fed
    environment["LOG_FORMAT"] = "json"
    return environment


async def produce(
    bootstrap: str, topic: str, messages: Iterable[tuple[bytes | None, bytes | None]]
) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    count = 0
    try:
        for key, value in messages:
            await producer.send(topic, value=value, key=key)
            count += 1
        await producer.flush()
    finally:
        await producer.stop()
    return count


def encode(event: Mapping[str, Any]) -> bytes:
    return orjson.dumps(event)


async def read_all(bootstrap: str, topic: str, expected: int, timeout: float = 30) -> list[Any]:
    """Reads a topic from the beginning until `expected` records arrived or time ran out."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    records: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while len(records) < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for partition_records in batch.values():
                records.extend(partition_records)
    finally:
        await consumer.stop()
    return records


async def wait_until(
    condition: Callable[[], Awaitable[bool]], timeout: float = 60, interval: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await condition():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def fetch(database_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(database_url)
    try:
        return list(await connection.fetch(sql, *args))
    finally:
        await connection.close()


async def fetchval(database_url: str, sql: str, *args: Any) -> Any:
    connection = await asyncpg.connect(database_url)
    try:
        return await connection.fetchval(sql, *args)
    finally:
        await connection.close()


async def committed_offsets_total(bootstrap: str, group: str, topics: Iterable[str]) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    except KafkaError:  # the group's coordinator is still being elected
        return -1
    finally:
        await admin.close()
    wanted = set(topics)
    return sum(
        meta.offset for tp, meta in offsets.items() if tp.topic in wanted and meta.offset > 0
    )


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, clock: Clock | None = None) -> AsyncIterator[Worker]:
    """The worker in this process, stopped the way SIGTERM stops it."""
    worker = Worker(settings, clock)
    task = asyncio.create_task(worker.run(), name="worker-under-test")
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, timeout=60)


class WorkerProcess:
    """`license-worker run` as a real subprocess, for crash and acceptance tests."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self._environment = settings_environment(settings)
        self._log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        log_file = self._log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run"],
            env=self._environment,
            stdout=log_file,
            stderr=log_file,
            cwd=REPO_ROOT,
        )
        log_file.close()
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def log_text(self) -> str:
        return self._log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def metric(text: str, name: str, **labels: str) -> float | None:
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return None


def required_tool(command: str, package: str) -> str:
    """The path of a Debian-packaged tool some tests need. CI installs it
    (SERVICES_AUTO_INSTALL=1, scripts/test.sh): missing there is a failure; elsewhere the
    test is skipped with the reason."""
    path = shutil.which(command)
    if path is None:
        reason = f"{command} is not installed (apt-get install {package})"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"{reason}; CI must run this check")
        pytest.skip(reason)
    return path

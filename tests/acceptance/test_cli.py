"""The real `license-worker` command as a subprocess, as an operator runs it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
import trustme

from tests.support import (
    CLI,
    OWNER_PASSWORD,
    REPO_ROOT,
    ROLES,
    WORKER_PASSWORD,
    Services,
    fetchval,
    make_settings,
    run_cli,
    settings_environment,
    url_as,
    wait_until,
)

pytestmark = pytest.mark.acceptance


@pytest.fixture
async def empty_database_url(services: Services) -> AsyncIterator[str]:
    url = await services.create_database("license_cli")
    yield url
    await services.drop_database(url)


async def test_migrate_create_topics_simulate_run_status(
    services: Services, empty_database_url: str, tmp_path: Path
) -> None:
    suffix = uuid.uuid4().hex[:8]
    topics = {
        "heartbeat_topic": f"cli.heartbeat.{suffix}",
        "lifecycle_topic": f"cli.lifecycle.{suffix}",
        "dlq_topic": f"cli.dlq.{suffix}",
        "license_events_topic": f"cli.license.{suffix}",
        "admin_topic": f"cli.admin.{suffix}",
        "consumer_group": f"cli-{suffix}",
        "admin_consumer_group": f"cli-admin-{suffix}",
    }
    # The operator's order: a DBA creates the roles, the release job migrates as the owner,
    # the worker runs as the worker role; both passwords come from files (mounted secrets).
    admin = settings_environment(make_settings(services, empty_database_url, topics))
    owner_password, worker_password = tmp_path / "owner-password", tmp_path / "worker-password"
    owner_password.write_text(OWNER_PASSWORD + "\n")
    worker_password.write_text(WORKER_PASSWORD + "\n")
    roles = run_cli(
        admin,
        "create-roles",
        "--owner-password-file",
        str(owner_password),
        "--worker-password-file",
        str(worker_password),
    )
    assert roles.returncode == 0, roles.stderr
    assert "migrate as license_owner, run the worker as license_worker" in roles.stdout
    owner = {
        **admin,
        "DATABASE_URL": url_as(empty_database_url, ROLES.owner, None),
        "DATABASE_PASSWORD_FILE": str(owner_password),
    }
    environment = {
        **admin,
        "DATABASE_URL": url_as(empty_database_url, ROLES.worker, None),
        "DATABASE_PASSWORD_FILE": str(worker_password),
    }

    for _ in range(2):  # migrate is safe to repeat
        migrated = run_cli(owner, "migrate")
        assert migrated.returncode == 0, migrated.stderr
    assert "migration.finished" in migrated.stderr
    regranted = run_cli(admin, "create-roles")  # the grants of the tables just created
    assert regranted.returncode == 0, regranted.stderr
    refused = run_cli(environment, "migrate")
    assert refused.returncode == 1
    assert "role license_worker may not change the schema" in refused.stderr
    assert "Traceback" not in refused.stderr
    created = run_cli(environment, "create-topics", "--partitions", "2")
    assert created.returncode == 0, created.stderr
    simulated = run_cli(
        environment, "simulate", "--customers", "2", "--devices-per-customer", "10", "--rounds", "3"
    )
    assert simulated.returncode == 0, simulated.stderr
    assert "produced 80 agent events" in simulated.stdout

    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log_file:
        worker = subprocess.Popen(
            [*CLI, "run"], env=environment, cwd=REPO_ROOT, stdout=log_file, stderr=log_file
        )
    try:

        async def stored() -> bool:
            return await fetchval(empty_database_url, "SELECT count(*) FROM devices") == 20

        await wait_until(stored, timeout=60)
    finally:
        worker.send_signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(worker.wait, 60)
    assert exit_code == 0, log_path.read_text()
    log_text = log_path.read_text()
    assert '"event": "worker.stopped"' in log_text
    assert '"event": "worker.starting"' in log_text
    # One stream: every line JSON (aiokafka's too), each with the version and the replica.
    for line in log_text.splitlines():
        fields = orjson.loads(line)
        assert fields["version"], line
        assert fields["replica"], line

    status = run_cli(environment, "status")
    assert status.returncode == 0, status.stderr
    assert "devices: 20" in status.stdout
    assert "lifecycle_events: 20" in status.stdout

    active = "SELECT count(*) FROM licenses WHERE active"
    licensed = await fetchval(empty_database_url, active)
    assert licensed > 0
    later = (datetime.now(UTC) + timedelta(days=31)).isoformat().replace("+00:00", "Z")
    dry = run_cli(environment, "sweep", "--once", "--now", later, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert orjson.loads(dry.stdout)["released"] == licensed
    assert await fetchval(empty_database_url, active) == licensed, "a dry run changes nothing"
    swept = run_cli(environment, "sweep", "--once", "--now", later)
    assert swept.returncode == 0, swept.stderr
    report = orjson.loads(swept.stdout)
    assert (report["released"], report["dry_run"], report["waited_for_lag"]) == (
        licensed,
        False,
        False,
    )
    assert await fetchval(empty_database_url, active) == 0


def test_sweep_rejects_a_time_without_zone_and_confirming_an_unknown_hold() -> None:
    naive = run_cli(dict(os.environ), "sweep", "--once", "--now", "2026-12-30T00:00:00")
    assert naive.returncode == 2
    assert "give a time zone" in naive.stderr
    garbage = run_cli(dict(os.environ), "sweep", "--once", "--now", "yesterday")
    assert garbage.returncode == 2
    assert "not an ISO 8601 time" in garbage.stderr


async def test_confirming_releases_without_a_hold_fails_clearly(
    services: Services, empty_database_url: str
) -> None:
    environment = {**os.environ, "DATABASE_URL": empty_database_url}
    assert run_cli(environment, "migrate").returncode == 0
    result = run_cli(environment, "confirm-releases", "no-such-customer")
    assert result.returncode == 1
    assert "no unconfirmed hold for customer 'no-such-customer'" in result.stderr


def test_invalid_configuration_fails_fast_with_a_clear_message() -> None:
    environment = {**os.environ, "BATCH_MAX_RECORDS": "0"}
    result = run_cli(environment, "run")
    assert result.returncode != 0
    assert "invalid configuration: BATCH_MAX_RECORDS" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["run"], ["sweep", "--once"]])
def test_run_and_sweep_refuse_to_start_without_a_pseudonym_key(command: list[str]) -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PSEUDONYM_KEY")}
    result = run_cli(environment, *command)
    assert result.returncode == 1
    assert "invalid configuration: PSEUDONYM_KEY_FILE is not set" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_sample_pseudonym_key_is_refused(tmp_path: Path) -> None:
    sample = tmp_path / "pseudonym.key"
    sample.write_text("CHANGE-ME-to-64-random-hex-characters\n")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PSEUDONYM_KEY")}
    result = run_cli({**environment, "PSEUDONYM_KEY_FILE": str(sample)}, "run")
    assert result.returncode == 1
    assert "PSEUDONYM_KEY_FILE: the pseudonym key is the sample value" in result.stderr
    assert "CHANGE-ME" not in result.stderr


def test_export_schemas_writes_json_schema(tmp_path: Path) -> None:
    result = run_cli(dict(os.environ), "export-schemas", str(tmp_path))
    assert result.returncode == 0, result.stderr
    written = tmp_path / "agent-event.v1.schema.json"
    assert written.exists()
    assert '"heartbeat"' in written.read_text()


async def test_check_exits_0_when_services_answer_and_1_when_they_do_not(
    services: Services, database_url: str
) -> None:
    reachable = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": services.kafka_bootstrap_servers,
        "DATABASE_URL": database_url,  # migrated: `check` reports a database that is not
    }
    result = await asyncio.to_thread(run_cli, reachable, "check")
    assert result.returncode == 0, result.stderr
    unreachable = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",
        "DATABASE_URL": "postgresql://postgres@127.0.0.1:9/none",
    }
    result = await asyncio.to_thread(run_cli, unreachable, "check", "--timeout", "3")
    assert result.returncode == 1
    assert (
        "Error: postgres: cannot reach Postgres at 127.0.0.1:9/none (DATABASE_URL): connection "
        "refused; kafka: cannot reach Kafka at 127.0.0.1:9 (KAFKA_BOOTSTRAP_SERVERS): "
        "connection refused"
    ) in result.stderr


async def test_check_over_tls_and_with_an_untrusted_postgres_certificate(
    services: Services, database_url: str, tmp_path: Path
) -> None:
    if services.state_dir is None or not (services.state_dir / "pg-tls" / "ca.crt").exists():
        pytest.skip("needs Postgres with TLS from deploy/local/services.sh")
    other_ca = tmp_path / "other-ca.crt"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    base = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": services.kafka_bootstrap_servers}
    for root_certificate, expected_code in (
        (services.state_dir / "pg-tls" / "ca.crt", 0),
        (other_ca, 1),
    ):
        migrated = services.superuser_url(database_url)
        url = f"{migrated}?sslmode=verify-full&sslrootcert={root_certificate}"
        result = await asyncio.to_thread(run_cli, {**base, "DATABASE_URL": url}, "check")
        assert result.returncode == expected_code, result.stderr
    assert "postgres: Postgres's TLS certificate is not trusted" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreadable_password_file_stops_start_up_with_a_clear_message(tmp_path: Path) -> None:
    environment = {**os.environ, "DATABASE_PASSWORD_FILE": str(tmp_path / "missing")}
    result = run_cli(environment, "check")
    assert result.returncode == 1
    assert (
        f"invalid configuration: DATABASE_PASSWORD_FILE: cannot read {tmp_path / 'missing'}: "
        "No such file or directory"
    ) in result.stderr
    assert "Traceback" not in result.stderr

"""`license-worker run` with weak settings: a local run says so (`security.weak_setting`)
and starts; STRICT_SECURITY=true refuses to start, naming the setting. The superuser check
asks the real database."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support import (
    CLI,
    REPO_ROOT,
    Services,
    free_port,
    http_get,
    make_settings,
    run_cli,
    settings_environment,
    wait_until,
)
from worker.weak_settings import role_weaknesses

pytestmark = pytest.mark.acceptance
SECRETS = ("worker-test-password", "owner-test-password")


def weak_setting_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if '"event": "security.weak_setting"' in line]


async def test_a_local_run_warns_of_each_weak_setting_and_starts(
    services: Services, database_url: str, topics: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    superuser = services.superuser_url(database_url)  # no sslmode, as a superuser
    settings = make_settings(services, superuser, topics, metrics_port=port)
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log_file:
        worker = subprocess.Popen(
            [*CLI, "run"],
            env=settings_environment(settings),
            cwd=REPO_ROOT,
            stdout=log_file,
            stderr=log_file,
        )
    try:

        async def ready() -> bool:
            # Ready, not only alive: the probes answer before the worker has connected and
            # checked its database role (the third warning).
            try:
                return (await asyncio.to_thread(http_get, port, "/readyz"))[0] == 200
            except OSError:
                return False

        await wait_until(ready, timeout=60)
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker.wait, 60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    log = log_path.read_text()
    warned = weak_setting_lines(log)
    assert len(warned) == 3, log
    assert any('"setting": "DATABASE_URL sslmode (absent)"' in line for line in warned)
    assert any('"setting": "KAFKA_SECURITY_PROTOCOL"' in line for line in warned)
    assert any('"setting": "DATABASE_URL"' in line and "superuser" in line for line in warned)
    assert all('"level": "warning"' in line for line in warned)
    for secret in SECRETS:
        assert secret not in log


async def test_strict_security_refuses_a_weak_configuration_before_connecting(
    services: Services, database_url: str, topics: dict[str, str]
) -> None:
    settings = make_settings(services, database_url, topics, strict_security=True)
    result = await asyncio.to_thread(run_cli, settings_environment(settings), "run", timeout=60)
    assert result.returncode == 1, result.stderr
    assert "Error: STRICT_SECURITY=true refuses to start with weak settings" in result.stderr
    assert "DATABASE_URL sslmode (absent)" in result.stderr
    assert "KAFKA_SECURITY_PROTOCOL: PLAINTEXT" in result.stderr
    assert "Traceback" not in result.stderr
    assert "security.weak_setting" in result.stderr + result.stdout


@pytest.fixture
def postgres_ca(services: Services) -> Path:
    if services.state_dir is None or services.secure is None:
        pytest.skip("needs the TLS Postgres and SASL_SSL Kafka of deploy/local/services.sh")
    path = services.state_dir / "pg-tls" / "ca.crt"
    if not path.exists():
        pytest.skip("these local services were started without TLS; restart them")
    return path


async def test_strict_security_refuses_a_superuser_and_accepts_the_worker_role(
    services: Services,
    database_url: str,
    topics: dict[str, str],
    postgres_ca: Path,
    tmp_path: Path,
) -> None:
    """Everything else as the manifests have it (verify-full, SASL_SSL with SCRAM): only the
    database can tell that the role is a superuser."""
    assert services.secure is not None
    tls = f"?sslmode=verify-full&sslrootcert={postgres_ca}"
    strict = {"strict_security": True, **services.secure.overrides()}

    superuser = make_settings(
        services, services.superuser_url(database_url) + tls, topics, **strict
    )
    refused = await asyncio.to_thread(run_cli, settings_environment(superuser), "run", timeout=60)
    assert refused.returncode == 1, refused.stderr
    [error] = [line for line in refused.stderr.splitlines() if line.startswith("Error: ")]
    [superuser_weakness] = role_weaknesses(is_superuser=True)
    assert error == (
        "Error: STRICT_SECURITY=true refuses to start with weak settings: "
        f"{superuser_weakness.describe()}"
    ), "the superuser, and nothing else"

    worker = make_settings(services, database_url + tls, topics, **strict)
    log_path = tmp_path / "strict.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [*CLI, "run"],
            env=settings_environment(worker),
            cwd=REPO_ROOT,
            stdout=log_file,
            stderr=log_file,
        )
    try:

        async def consuming() -> bool:
            assert process.poll() is None, log_path.read_text()
            return '"event": "ingest.partitions_assigned"' in log_path.read_text()

        await wait_until(consuming, timeout=60)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert weak_setting_lines(log_path.read_text()) == []

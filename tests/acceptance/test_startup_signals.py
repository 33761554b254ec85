"""SIGTERM and SIGINT stop `license-worker run` while it still waits for Kafka or Postgres
at start-up: a pod that cannot reach its services yet must not need a SIGKILL to go."""

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
    make_settings,
    settings_environment,
    url_as,
    wait_until,
)

pytestmark = pytest.mark.acceptance
STOP_WITHIN_SECONDS = 15


async def _stop_while_waiting(
    environment: dict[str, str], log_path: Path, waiting_for: str, signal_number: int
) -> str:
    with log_path.open("wb") as log_file:
        worker = subprocess.Popen(
            [*CLI, "run"], env=environment, cwd=REPO_ROOT, stdout=log_file, stderr=log_file
        )
    try:

        async def waiting() -> bool:
            log = await asyncio.to_thread(log_path.read_text)
            return '"event": "startup.waiting"' in log and f'"service": "{waiting_for}"' in log

        await wait_until(waiting, timeout=60)
        worker.send_signal(signal_number)
        exit_code = await asyncio.to_thread(worker.wait, STOP_WITHIN_SECONDS)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    log = await asyncio.to_thread(log_path.read_text)
    assert exit_code == 0, log
    return log


async def test_sigterm_ends_the_wait_for_an_unreachable_kafka(
    services: Services, database_url: str, topics: dict[str, str], tmp_path: Path
) -> None:
    settings = make_settings(services, database_url, topics, metrics_port=free_port())
    environment = {
        **settings_environment(settings),
        # Nothing listens there: the worker connects to Postgres, then waits for Kafka.
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "RETRY_MAX_SECONDS": "30",
    }
    log = await _stop_while_waiting(
        environment, tmp_path / "run.log", "kafka-producer", signal.SIGTERM
    )
    assert '"event": "worker.stopped_during_startup"' in log
    assert '"event": "worker.stopped"' in log
    assert "Traceback" not in log


async def test_sigint_ends_the_wait_for_an_unreachable_postgres(
    services: Services, database_url: str, topics: dict[str, str], tmp_path: Path
) -> None:
    settings = make_settings(services, database_url, topics, metrics_port=free_port())
    unreachable = url_as(f"postgresql://127.0.0.1:{free_port()}/license", "license_worker", None)
    environment = {
        **settings_environment(settings),
        "DATABASE_URL": unreachable,
        "RETRY_MAX_SECONDS": "30",
    }
    environment.pop("DATABASE_PASSWORD_FILE", None)
    log = await _stop_while_waiting(environment, tmp_path / "run.log", "postgres", signal.SIGINT)
    assert '"event": "worker.stopped_during_startup"' in log
    assert "Traceback" not in log

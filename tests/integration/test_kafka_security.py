"""The worker against Kafka's SASL_SSL listener (TLS with the local test CA, a SCRAM-SHA-512
user): it ingests, dead-letters and publishes license events through it, and a wrong
password or an untrusted certificate stops it at start-up with a message saying so.

The test's own producers and readers use the broker's PLAINTEXT listener: same broker, same
topics, so what the worker did is checked independently of its secured connection."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest
import trustme
from aiokafka.errors import KafkaConnectionError

from tests.integration.license_support import ALICE, KIOSK, day, send
from tests.support import (
    SecureKafka,
    Services,
    WorkerProcess,
    committed_offsets_total,
    fetch,
    make_settings,
    produce,
    read_all,
    run_cli,
    running_worker,
    settings_environment,
    wait_until,
)
from worker.failures import ServiceUnreachable
from worker.ingest.dlq_tools import read_dead_letters
from worker.kafka.clients import diagnose_connection, start_with_retry
from worker.licensing.relay import publish_pending_once
from worker.settings import Settings

pytestmark = pytest.mark.integration

WRONG_PASSWORD = "not-the-password"  # must never show in a log
REFUSED_PASSWORD = "rejected the SASL credentials for user 'license-worker' (SCRAM-SHA-512)"
UNTRUSTED = "is not trusted by KAFKA_SSL_CAFILE="


@pytest.fixture
def secure(services: Services) -> SecureKafka:
    if services.secure is None:
        pytest.skip("needs the SASL_SSL listener of deploy/local/services.sh (env-secure)")
    return services.secure


@pytest.fixture
def other_ca_file(tmp_path: Path) -> str:
    """A CA that did not sign the broker's certificate."""
    path = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


async def test_worker_ingests_dead_letters_and_publishes_over_sasl_ssl(
    services: Services, secure: SecureKafka, database_url: str, topics: dict[str, str]
) -> None:
    settings = make_settings(
        services,
        database_url,
        topics,
        sweep_enabled=False,
        relay_poll_seconds=0.1,
        **secure.overrides(),
    )
    assert settings.kafka_security_protocol == "SASL_SSL"
    assert settings.kafka_bootstrap_servers != services.kafka_bootstrap_servers
    total = await send(services, settings, [(ALICE, "install", day(0)), (KIOSK, "install", day(0))])
    total += await produce(
        services.kafka_bootstrap_servers, settings.heartbeat_topic, [(b"bad-1", b"{not json")]
    )

    async with running_worker(settings):

        async def all_committed() -> bool:
            committed = await committed_offsets_total(
                services.kafka_bootstrap_servers, settings.consumer_group, settings.agent_topics
            )
            return committed >= total

        await wait_until(all_committed, timeout=60)
        events = await read_all(
            services.kafka_bootstrap_servers, settings.license_events_topic, 2, timeout=30
        )

    devices = await fetch(database_url, "SELECT device_id FROM devices ORDER BY device_id")
    assert [row["device_id"] for row in devices] == ["alice-laptop", "kiosk-1"]
    published = [orjson.loads(record.value) for record in events]
    assert sorted((e["type"], e["subject_id"]) for e in published) == [
        ("license.allocated", "alice@acme.example"),
        ("license.allocated", "kiosk-1"),
    ]
    [dead] = await read_all(services.kafka_bootstrap_servers, settings.dlq_topic, 1)
    assert (dead.key, dead.value) == (b"bad-1", b"{not json")

    # The one-shot tools over the same listener: `dlq inspect` and `publish-events`.
    letters = [letter async for letter in read_dead_letters(settings)]
    assert [(letter.reason, letter.value) for letter in letters] == [("invalid_json", b"{not json")]
    assert await publish_pending_once(settings) == 0


@pytest.mark.parametrize("mistake", ["wrong_password", "untrusted_ca"])
async def test_run_stops_at_once_on_a_refusal(
    services: Services,
    secure: SecureKafka,
    database_url: str,
    topics: dict[str, str],
    other_ca_file: str,
    tmp_path: Path,
    mistake: str,
) -> None:
    change, expected = {
        "wrong_password": ({"kafka_sasl_password": WRONG_PASSWORD}, REFUSED_PASSWORD),
        "untrusted_ca": ({"kafka_ssl_cafile": other_ca_file}, UNTRUSTED + other_ca_file),
    }[mistake]
    settings = make_settings(services, database_url, topics, **secure.overrides(**change))
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    assert worker.process is not None
    started = time.monotonic()
    try:
        status = await asyncio.to_thread(worker.process.wait, 30)
    finally:
        if worker.process.poll() is None:
            worker.kill()
    elapsed = time.monotonic() - started

    log = worker.log_text()
    assert status == 1, log
    assert elapsed < 15, f"took {elapsed:.1f} s to give up"
    lines = log.splitlines()
    assert any('"event": "kafka.access_refused"' in line and expected in line for line in lines)
    assert lines[-1].startswith("Error: "), "the last line says why"
    assert expected in lines[-1]
    assert "Traceback" not in log
    assert "Unclosed" not in log
    assert '"startup.waiting"' not in log, "a refusal is not waited out"
    assert WRONG_PASSWORD not in log


ONE_SHOT_COMMANDS = [
    ("check",),
    ("create-topics",),
    ("publish-events",),
    ("license-events", "--timeout", "1"),
    ("dlq", "inspect"),
    ("dlq", "replay"),
    ("sweep", "--once"),
    ("simulate", "--customers", "1", "--devices-per-customer", "1", "--rounds", "1"),
]


async def test_one_shot_commands_name_the_refusal(
    services: Services, secure: SecureKafka, database_url: str, topics: dict[str, str]
) -> None:
    settings = make_settings(
        services,
        database_url,
        topics,
        **secure.overrides(kafka_sasl_password=WRONG_PASSWORD),
    )
    environment = settings_environment(settings)

    results = await asyncio.gather(
        *(
            asyncio.to_thread(run_cli, environment, *arguments, timeout=60)
            for arguments in ONE_SHOT_COMMANDS
        )
    )
    for arguments, result in zip(ONE_SHOT_COMMANDS, results, strict=True):
        error_line = result.stderr.splitlines()[-1] if result.stderr else ""
        assert result.returncode == 1, (arguments, result.stderr)
        assert error_line.startswith("Error: "), (arguments, result.stderr)
        assert REFUSED_PASSWORD in error_line, (arguments, result.stderr)
        assert "Traceback" not in result.stderr, arguments
        assert "Unclosed" not in result.stderr, arguments


async def test_a_listener_that_is_not_up_is_waited_for_not_refused(
    services: Services, secure: SecureKafka, database_url: str, topics: dict[str, str]
) -> None:
    closed_port = secure.settings["kafka_bootstrap_servers"].rsplit(":", 1)[0] + ":1"
    settings = make_settings(
        services,
        database_url,
        topics,
        **secure.overrides(kafka_bootstrap_servers=closed_port),
    )
    cause = await diagnose_connection("test", settings)
    assert isinstance(cause, ConnectionRefusedError)

    attempts = 0

    async def start() -> None:
        nonlocal attempts
        attempts += 1
        raise KafkaConnectionError("Unable to bootstrap")

    with pytest.raises(ServiceUnreachable, match=r"cannot reach Kafka .* connection refused"):
        await start_with_retry("test", start, settings, attempts=3)
    assert attempts == 3, "retried, not given up as a refusal"


async def test_the_secured_listener_takes_the_right_password(secure: SecureKafka) -> None:
    settings = Settings(**secure.overrides())
    assert await diagnose_connection("test", settings) is None

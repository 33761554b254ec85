"""Logs, metrics and DLQ headers never hold personal data or credentials.

A real `license-worker run` at log level debug (a superset of info) ingests a user with
known personal values through every path: stored, dead-lettered for each reason (the bad
field holding a personal value), refused by Postgres with a message that quotes the row,
released and purged by `license-worker sweep`, published by the relay. Its log, the sweeps'
output, a /metrics scrape and the DLQ headers are then searched for the values and the
secrets. (DLQ values are the original bytes by contract, and are not searched.)"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.integration.license_support import day, rows_containing
from tests.support import (
    WORKER_PASSWORD,
    Services,
    WorkerProcess,
    committed_offsets_total,
    encode,
    fetchval,
    free_port,
    http_get,
    make_settings,
    metric,
    produce,
    read_all,
    run_cli,
    settings_environment,
    wait_until,
)
from worker.settings import Settings
from worker.sim.fleet import SimulatedDevice, agent_event

pytestmark = pytest.mark.integration

EMAIL = "zoe.leak@private.example"
USER_ID = "zoe.user@private.example"  # the contract's own example uses an e-mail as user id
DISPLAY_NAME = "Zoë Leakington"
HOSTNAME = "zoe-private-laptop"
PERSONAL = [EMAIL, USER_ID, DISPLAY_NAME, HOSTNAME, "zoe.leak", "zoe.user", "Leakington"]
# The worker role's password (the database_url fixture logs in with it).
DB_PASSWORD = WORKER_PASSWORD
KAFKA_PASSWORD = "kafka-secret-51c2d"
PSEUDONYM_KEY = "5ec2e7a1b9d04f3c8e6a2d1f0b9c8e7d6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d"
SECRETS = [DB_PASSWORD, KAFKA_PASSWORD, PSEUDONYM_KEY]
MAX_BYTES = 4096

# A row Postgres refuses with a message that quotes it, as real constraint and type errors do.
QUOTING_TRIGGER = """
CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.device_id = 'poison' THEN
        RAISE EXCEPTION 'refused device of % on %', NEW.user_id, NEW.hostname
            USING ERRCODE = '22023', DETAIL = NEW.user_id;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_poison BEFORE INSERT OR UPDATE ON devices
    FOR EACH ROW EXECUTE FUNCTION refuse_poison();
"""

LAPTOP = SimulatedDevice("cust-pii", "dev-1", USER_ID, "business")
POISON = SimulatedDevice("cust-pii", "poison", USER_ID, "business")


def install(device: SimulatedDevice, **changes: Any) -> dict[str, Any]:
    event = agent_event(device, "install", day(0))
    event.update(hostname=HOSTNAME, user={"email": EMAIL, "display_name": DISPLAY_NAME})
    event.update(changes)
    return event


def bad_messages() -> dict[str, tuple[str, bytes]]:
    """Name: (expected DLQ reason, bytes); each holds personal values where it goes wrong."""
    padded = install(LAPTOP, padding=EMAIL * (MAX_BYTES // len(EMAIL)))
    return {
        "nul-in-user_id": ("schema_violation", encode(install(LAPTOP, user_id=USER_ID + "\0"))),
        "long-email": ("schema_violation", encode(install(LAPTOP, user={"email": EMAIL * 30}))),
        "nul-in-hostname": ("schema_violation", encode(install(LAPTOP, hostname=HOSTNAME + "\0"))),
        "listed-name": (
            "schema_violation",
            encode(install(LAPTOP, user={"display_name": [EMAIL]})),
        ),
        "email-as-time": ("schema_violation", encode(install(LAPTOP, occurred_at=EMAIL))),
        "name-as-kind": ("schema_violation", encode(install(LAPTOP, device_kind=DISPLAY_NAME))),
        "rtl-in-user_id": ("schema_violation", encode(install(LAPTOP, user_id="\u202e" + USER_ID))),
        "email-as-type": ("unknown_type", encode(install(LAPTOP, type=EMAIL))),
        "email-as-version": (
            "unsupported_schema_version",
            encode(install(LAPTOP, schema_version=EMAIL)),
        ),
        "invalid-json": ("invalid_json", f'{{"user_id": "{USER_ID}", "email": {EMAIL}}}'.encode()),
        "invalid-utf8": ("invalid_utf8", f'{{"email": "{EMAIL}'.encode() + b'\xff"}'),
        "not-an-object": ("not_an_object", encode([EMAIL, DISPLAY_NAME])),
        "oversized": ("oversized", encode(padded)),
        "refused-row": ("database_rejected", encode(install(POISON))),
    }


def spellings(value: str) -> list[str]:
    """The value as text and as a JSON logger may escape it (`\\u00eb`)."""
    return sorted({value, json.dumps(value)[1:-1], value.lower()})


def leaks(text: str) -> list[str]:
    found = [v for value in PERSONAL + SECRETS for v in spellings(value) if v in text]
    return sorted(set(found))


def sweep_cli(settings: Settings, at: str) -> str:
    result = run_cli(settings_environment(settings), "sweep", "--once", "--now", at)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


@pytest.fixture
def settings(services: Services, database_url: str, topics: dict[str, str]) -> Settings:
    return make_settings(
        services,
        database_url,
        topics,
        log_level="debug",
        metrics_port=free_port(),
        max_message_bytes=MAX_BYTES,
        sweep_enabled=False,  # `license-worker sweep` runs it, on a set clock
        relay_poll_seconds=0.1,
        monitor_interval_seconds=0.5,
        kafka_sasl_password=KAFKA_PASSWORD,  # unused with PLAINTEXT, but configured and logged
        pseudonym_key=PSEUDONYM_KEY,
    )


async def test_no_personal_value_or_secret_reaches_logs_metrics_or_dlq_headers(
    services: Services, settings: Settings, database_url: str, tmp_path: Path
) -> None:
    assert DB_PASSWORD in database_url
    connection = await asyncpg.connect(services.superuser_url(database_url))
    try:
        await connection.execute(QUOTING_TRIGGER)
    finally:
        await connection.close()
    bad = bad_messages()
    good = [
        encode(install(LAPTOP)),
        encode(agent_event(LAPTOP, "heartbeat", day(0) + timedelta(minutes=5))),
    ]
    messages = [(LAPTOP.key, value) for value in good]
    messages += [(LAPTOP.key, value) for _, value in bad.values()]
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        total = await produce(services.kafka_bootstrap_servers, settings.lifecycle_topic, messages)

        async def all_committed() -> bool:
            committed = await committed_offsets_total(
                services.kafka_bootstrap_servers, settings.consumer_group, settings.agent_topics
            )
            return committed >= total

        await wait_until(all_committed, timeout=90)
        dead_letters = await read_all(
            services.kafka_bootstrap_servers, settings.dlq_topic, len(bad)
        )

        sweep_output = sweep_cli(settings, day(31).isoformat())  # releases the user
        sweep_output += sweep_cli(settings, day(122).isoformat())  # purges them

        async def outbox_published() -> bool:
            pending = "SELECT count(*) FROM license_outbox WHERE published_at IS NULL"
            return await fetchval(database_url, pending) == 0

        await wait_until(outbox_published, timeout=30)
        status, metrics_text = http_get(settings.metrics_port, "/metrics")
    finally:
        exit_code = worker.terminate()
    log_text = worker.log_text()

    # The paths really ran: what the search below found nothing in is not empty.
    assert exit_code == 0, log_text[-2000:]
    assert status == 200
    assert '"event": "ingest.batch_committed"' in log_text, "debug lines are in the log"
    assert '"event": "database.rejected_batch"' in log_text
    assert sweep_output.count('"event": "sweep.finished"') == 2
    assert '"released": 1' in sweep_output
    assert '"purged": 1' in sweep_output
    assert sorted(dict(r.headers)["dlq.error.class"].decode() for r in dead_letters) == sorted(
        reason for reason, _ in bad.values()
    )
    for reason in {reason for reason, _ in bad.values()}:
        labels = {"reason": reason, "topic": settings.lifecycle_topic}  # exposition order
        counted = metric(metrics_text, "license_worker_dead_letters_total", **labels)
        assert counted, [line for line in metrics_text.splitlines() if "dead_letters" in line]

    assert leaks(log_text) == [], "worker log"
    assert leaks(sweep_output) == [], "sweep output"
    assert leaks(metrics_text) == [], "/metrics"
    for record in dead_letters:
        headers = "\n".join(f"{name}={value.decode()}" for name, value in record.headers)
        assert leaks(headers) == [], headers

    # And nothing personal survives the purge, in any table (outbox payloads included).
    for value in (EMAIL, USER_ID, DISPLAY_NAME, HOSTNAME):
        assert await rows_containing(settings, value) == [], value

"""License events signed for billing (LICENSE_EVENTS_SIGNING_KEY_FILE), on real Kafka and
Postgres: every event the worker publishes verifies, `license-events verify` says so, a forged
event on the topic is reported with a non-zero exit, a relay that crashed re-publishes the
same signatures, and without the setting nothing changes."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from tests.integration.license_support import (
    ALICE_DEVICES,
    KIOSK,
    day,
    ingest,
    publish_outbox,
    send,
)
from tests.support import (
    REPO_ROOT,
    Services,
    committed_offsets_total,
    fetchval,
    make_settings,
    read_all,
    run_cli,
    running_worker,
    settings_environment,
    wait_until,
)
from worker.clock import FixedClock
from worker.settings import Settings
from worker.trust.license_events import license_event_headers, verify_license_event
from worker.trust.signing import HMAC_HEADER, KEY_ID_HEADER, SigningKeys

pytestmark = pytest.mark.integration

SIGNATURE_HEADERS = {KEY_ID_HEADER, HMAC_HEADER}


def write_keys(path: Path, current: str = "2026-12") -> Path:
    document = {
        "current": current,
        "keys": {
            "2026-12": base64.b64encode(os.urandom(32)).decode(),
            "2026-06": base64.b64encode(os.urandom(32)).decode(),
        },
    }
    path.write_bytes(orjson.dumps(document))
    return path


def signed_settings(
    services: Services, database_url: str, topics: dict[str, str], key_file: Path, **more: Any
) -> Settings:
    return make_settings(
        services,
        database_url,
        topics,
        sweep_enabled=False,
        license_events_signing_key_file=key_file,
        **more,
    )


def cli_environment(settings: Settings, key_file: Path | None) -> dict[str, str]:
    environment = settings_environment(settings)
    if key_file is not None:  # settings_environment leaves out every *_FILE variable
        environment["LICENSE_EVENTS_SIGNING_KEY_FILE"] = str(key_file)
    return environment


async def outbox_counts(database_url: str) -> tuple[int, int]:
    """(published, pending) rows of the outbox."""
    published = await fetchval(
        database_url, "SELECT count(*) FROM license_outbox WHERE published_at IS NOT NULL"
    )
    pending = await fetchval(
        database_url, "SELECT count(*) FROM license_outbox WHERE published_at IS NULL"
    )
    return published, pending


async def produce_with_headers(
    services: Services, topic: str, records: list[tuple[bytes, bytes, list[tuple[str, bytes]]]]
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=services.kafka_bootstrap_servers, acks="all")
    await producer.start()
    try:
        for key, value, headers in records:
            await producer.send_and_wait(topic, value=value, key=key, headers=headers)
    finally:
        await producer.stop()


async def test_every_event_the_worker_publishes_verifies_and_the_cli_says_all_valid(
    services: Services, database_url: str, topics: dict[str, str], tmp_path: Path
) -> None:
    key_file = write_keys(tmp_path / "license-events.json")
    settings = signed_settings(services, database_url, topics, key_file)

    # The relay inside `run` publishes Alice's licenses.
    total = await send(services, settings, [(d, "install", day(0)) for d in ALICE_DEVICES])
    async with running_worker(settings, clock=FixedClock(day(0))):

        async def all_published() -> bool:
            committed = await committed_offsets_total(
                services.kafka_bootstrap_servers, settings.consumer_group, settings.agent_topics
            )
            published, pending = await outbox_counts(database_url)
            return committed >= total and published > 0 and pending == 0

        await wait_until(all_published, timeout=60)

    # `publish-events` publishes the kiosk's, decided by a worker without its relay.
    without_relay = signed_settings(services, database_url, topics, key_file, relay_enabled=False)
    total += await send(services, without_relay, [(KIOSK, "install", day(0))])
    await ingest(services, without_relay, day(0), total)
    assert (await outbox_counts(database_url))[1] == 1
    environment = cli_environment(settings, key_file)
    published = await asyncio.to_thread(run_cli, environment, "publish-events")
    assert published.returncode == 0, published.stderr
    assert "published 1 license events" in published.stdout

    published_rows, pending = await outbox_counts(database_url)
    assert pending == 0
    records = await read_all(
        services.kafka_bootstrap_servers, settings.license_events_topic, published_rows
    )
    assert len(records) == published_rows >= 2
    keys = settings.license_events_signing_keys()
    assert keys is not None
    for record in records:
        assert verify_license_event(keys, record.key, record.value, record.headers)
        assert dict(record.headers)[KEY_ID_HEADER] == b"2026-12"  # the current key signs
        assert record.key == orjson.loads(record.value)["customer_id"].encode()

    verified = await asyncio.to_thread(run_cli, environment, "license-events", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"{published_rows} records: {published_rows} valid, 0 unsigned" in verified.stdout
    # Billing's own copy of the keys file, without `current`, verifies the same.
    billing_file = tmp_path / "billing.json"
    billing_document = orjson.loads(key_file.read_bytes())
    billing_file.write_bytes(orjson.dumps({"keys": billing_document["keys"]}))
    billing = await asyncio.to_thread(
        run_cli,
        settings_environment(settings),
        "license-events",
        "verify",
        "--keys-file",
        str(billing_file),
    )
    assert billing.returncode == 0, billing.stdout + billing.stderr
    assert f"{published_rows} valid" in billing.stdout


async def test_forged_events_on_the_topic_are_reported_with_a_non_zero_exit(
    services: Services, database_url: str, topics: dict[str, str], tmp_path: Path
) -> None:
    key_file = write_keys(tmp_path / "license-events.json")
    settings = signed_settings(services, database_url, topics, key_file, relay_enabled=False)
    total = await send(services, settings, [(d, "install", day(0)) for d in ALICE_DEVICES])
    await ingest(services, settings, day(0), total)
    genuine_count = await publish_outbox(settings)
    assert genuine_count > 0
    genuine = (
        await read_all(
            services.kafka_bootstrap_servers, settings.license_events_topic, genuine_count
        )
    )[0]
    keys = settings.license_events_signing_keys()
    assert keys is not None

    event = orjson.loads(genuine.value)
    forged_value = orjson.dumps({**event, "event_id": event["event_id"][:-4] + "f0f0"})
    forger = SigningKeys({"forger": b"f" * 32}, current="forger")
    impostor = SigningKeys({"2026-12": b"i" * 32}, current="2026-12")
    genuine_headers = list(genuine.headers)
    forgeries = [
        (b"acme", forged_value, [("event_id", b"x")]),  # unsigned
        (b"acme", forged_value, license_event_headers(forger, b"acme", forged_value)),
        (b"acme", forged_value, license_event_headers(impostor, b"acme", forged_value)),
        (b"acme", forged_value, genuine_headers),  # a genuine signature on another value
        (b"globex", genuine.value, genuine_headers),  # moved to another customer's key
        (b"acme", forged_value, [*license_event_headers(keys, b"acme", forged_value)] * 2),
    ]
    # The last one is signed with the real key, but doubled: still not accepted.
    await produce_with_headers(services, settings.license_events_topic, forgeries)

    verified = await asyncio.to_thread(
        run_cli, cli_environment(settings, key_file), "license-events", "verify"
    )
    assert verified.returncode == 8  # differences, not a failure to run
    records = genuine_count + len(forgeries)
    assert (
        f"{records} records: {genuine_count} valid, 1 unsigned, 1 malformed, 1 unknown_key, "
        "3 bad_signature" in verified.stdout
    ), verified.stdout
    assert "6 of" in verified.stderr
    refused = [line for line in verified.stdout.splitlines() if line.startswith("partition ")]
    assert len(refused) == len(forgeries)
    assert any(line.endswith(": unsigned") for line in refused)
    assert "acme" not in verified.stdout + verified.stderr  # no customer or subject ids


async def test_a_relay_killed_after_publishing_re_publishes_the_same_signatures(
    services: Services, database_url: str, topics: dict[str, str], tmp_path: Path
) -> None:
    key_file = write_keys(tmp_path / "license-events.json")
    settings = signed_settings(
        services, database_url, topics, key_file, relay_enabled=False, leader_lease_seconds=1
    )
    devices = [*ALICE_DEVICES, KIOSK]
    total = await send(services, settings, [(d, "install", day(0)) for d in devices])
    await ingest(services, settings, day(0), total)
    assert (await outbox_counts(database_url))[1] == 3

    crashed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(Path(__file__).with_name("relay_crash.py"))],
        env=cli_environment(settings, key_file),
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert crashed.returncode == -9, crashed.stderr.decode()
    await asyncio.sleep(1.2)  # the killed relay's lease (1 s) lapses
    assert await publish_outbox(settings) == 3  # the restarted relay publishes them again

    records = await read_all(services.kafka_bootstrap_servers, settings.license_events_topic, 6)
    assert len(records) == 6
    copies: dict[bytes, list[tuple[bytes, bytes, bytes]]] = defaultdict(list)
    for record in records:
        headers = dict(record.headers)
        copies[headers["event_id"]].append(
            (record.value, headers[KEY_ID_HEADER], headers[HMAC_HEADER])
        )
    assert len(copies) == 3
    for both in copies.values():
        assert len(both) == 2
        assert both[0] == both[1], "the same bytes, the same key, the same signature"
    keys = settings.license_events_signing_keys()
    assert keys is not None
    assert all(verify_license_event(keys, r.key, r.value, r.headers) for r in records)


async def test_without_the_setting_events_carry_no_signature(
    services: Services, database_url: str, topics: dict[str, str], tmp_path: Path
) -> None:
    settings = make_settings(
        services, database_url, topics, sweep_enabled=False, relay_enabled=False
    )
    assert settings.license_events_signing_keys() is None
    total = await send(services, settings, [(d, "install", day(0)) for d in ALICE_DEVICES])
    await ingest(services, settings, day(0), total)
    published = await publish_outbox(settings)
    records = await read_all(
        services.kafka_bootstrap_servers, settings.license_events_topic, published
    )
    assert len(records) == published > 0
    for record in records:
        assert [name for name, _ in record.headers] == ["event_id"]

    # Verifying them with a keys file reports each one as unsigned.
    key_file = write_keys(tmp_path / "license-events.json")
    verified = await asyncio.to_thread(
        run_cli, cli_environment(settings, key_file), "license-events", "verify"
    )
    assert verified.returncode == 8
    assert f"{published} records: 0 valid, {published} unsigned" in verified.stdout
    # And without any keys, the command says what it needs.
    no_keys = await asyncio.to_thread(
        run_cli, settings_environment(settings), "license-events", "verify"
    )
    assert no_keys.returncode == 2
    assert "LICENSE_EVENTS_SIGNING_KEY_FILE" in no_keys.stderr

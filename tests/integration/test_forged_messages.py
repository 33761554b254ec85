"""Issue #14 part 1: an agent message can act only for the customer it is authenticated for,
and a customer exists because the console created it, not because a message named it.

Real Kafka and Postgres. A writer to the agent topics (or the console topic) forges installs,
uninstalls (timed at now + 300 s, inside the future-time clamp) and user changes (a newer
install with another e-mail, display name and host name) for a customer that is not theirs,
and signals for customers that were never created. Modes: UNKNOWN_CUSTOMERS refuse and admit;
gateway and console signatures on and off."""

from __future__ import annotations

import asyncio
import base64
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from tests.integration.license_support import (
    admin_event,
    apply_admin,
    billing_view,
    day,
    ingest,
    publish_outbox,
)
from tests.support import Services, fetch, make_settings, read_all, run_cli, settings_environment
from worker.settings import Settings
from worker.sim.fleet import SimulatedDevice, agent_event, encode, simulated_customer_id
from worker.sim.producer import produce_fleet
from worker.trust.signing import (
    SigningKeys,
    agent_signed_bytes,
    console_signed_bytes,
    sign,
)

pytestmark = pytest.mark.integration

VICTIM, MALLORY, GHOST = "victim", "mallory", "ghost"
ALICE = "alice@victim.example"
LAPTOP = SimulatedDevice(VICTIM, "alice-laptop", ALICE, "business")
PHONE = SimulatedDevice(VICTIM, "alice-phone", ALICE, "personal")
KIOSK = SimulatedDevice(VICTIM, "kiosk-1", None, "business")
MALLORY_PC = SimulatedDevice(MALLORY, "pc-1", "m@mallory.example", "business")
GHOST_PC = SimulatedDevice(GHOST, "pc-1", "g@ghost.example", "business")
TABLES = ["customers", "users", "devices", "device_lifecycle_events", "licenses"]
TABLES += ["license_history", "license_outbox", "subscriptions"]

GATEWAY = SigningKeys({"gw-2026-12": b"g" * 32, "gw-2026-06": b"h" * 32}, current="gw-2026-12")
CONSOLE = SigningKeys({"console-1": b"c" * 32}, current="console-1")
# What a writer to the topics may hold: a key of their own, not the gateway's.
FORGER = SigningKeys({"gw-2026-12": b"m" * 32, "forged": b"m" * 32}, current="forged")
Message = tuple[str, bytes, bytes, list[tuple[str, bytes]]]


def write_keys(path: Path, keys: SigningKeys) -> Path:
    encoded = {key_id: base64.b64encode(key).decode() for key_id, key in keys.keys.items()}
    path.write_bytes(orjson.dumps({"current": keys.current, "keys": encoded}))
    return path


@pytest.fixture
def settings(services: Services, database_url: str, topics: dict[str, str]) -> Settings:
    return make_settings(
        services,
        database_url,
        topics,
        sweep_enabled=False,
        relay_poll_seconds=0.1,
        unknown_customers="refuse",
    )


@pytest.fixture
def signed_settings(settings: Settings, tmp_path: Path) -> Settings:
    return settings.model_copy(
        update={
            "agent_signing_keys_file": write_keys(tmp_path / "gateway.json", GATEWAY),
            "console_signing_keys_file": write_keys(tmp_path / "console.json", CONSOLE),
        }
    )


def agent_message(
    settings: Settings,
    device: SimulatedDevice,
    event_type: str,
    at: datetime,
    keys: SigningKeys | None = None,
    key_id: str | None = None,
    **changes: Any,
) -> Message:
    """An agent message, signed over its own fields with `keys` (None: unsigned)."""
    event = {**agent_event(device, event_type, at), **changes}
    topic = settings.heartbeat_topic if event_type == "heartbeat" else settings.lifecycle_topic
    headers: list[tuple[str, bytes]] = []
    if keys is not None:
        fields = [event[name] for name in ("customer_id", "device_id", "event_id", "type")]
        headers = sign(keys, agent_signed_bytes(*fields, at), key_id)
    return topic, device.key, encode(event), headers


def console_message(
    settings: Settings, event: dict[str, Any], keys: SigningKeys | None = None
) -> Message:
    value = encode(event)
    headers = [] if keys is None else sign(keys, console_signed_bytes(value))
    return settings.admin_topic, event["customer_id"].encode(), value, headers


async def produce(services: Services, messages: list[Message]) -> dict[str, int]:
    """Sends the messages in order; returns how many went to each topic."""
    producer = AIOKafkaProducer(bootstrap_servers=services.kafka_bootstrap_servers, acks="all")
    await producer.start()
    counts: dict[str, int] = {}
    try:
        for topic, key, value, headers in messages:
            await producer.send_and_wait(topic, value, key=key, headers=headers)
            counts[topic] = counts.get(topic, 0) + 1
    finally:
        await producer.stop()
    return counts


class Topics:
    """Sends messages and runs the worker until every message so far is committed. The
    console's and the agents' loops are separate consumers: a test that needs a customer
    created processes the console's message before it sends the agents'."""

    def __init__(self, services: Services, settings: Settings) -> None:
        self.services, self.settings = services, settings
        self.console = self.agents = 0

    async def send(self, messages: list[Message]) -> None:
        counts = await produce(self.services, messages)
        self.console += counts.pop(self.settings.admin_topic, 0)
        self.agents += sum(counts.values())

    async def process(self, at: datetime) -> None:
        settings = self.settings
        if self.console:
            await apply_admin(self.services, settings, at, self.console)
        if self.agents:
            await ingest(self.services, settings, at, self.agents)


async def rows_of(settings: Settings, customer: str) -> dict[str, list[str]]:
    url = settings.database_url.get_secret_value()
    return {
        table: [
            row["line"]
            for row in await fetch(
                url, f"SELECT t::text AS line FROM {table} AS t WHERE customer_id = $1", customer
            )
        ]
        for table in TABLES
    }


async def active_licenses(settings: Settings, customer: str) -> set[tuple[str, str]]:
    rows = await fetch(
        settings.database_url.get_secret_value(),
        "SELECT subject_type, subject_id FROM licenses WHERE customer_id = $1 AND active",
        customer,
    )
    return {(row["subject_type"], row["subject_id"]) for row in rows}


async def customers(settings: Settings) -> set[str]:
    rows = await fetch(
        settings.database_url.get_secret_value(), "SELECT customer_id FROM customers"
    )
    return {row["customer_id"] for row in rows}


async def dead_letters(services: Services, settings: Settings, expected: int) -> list[Any]:
    letters = await read_all(services.kafka_bootstrap_servers, settings.dlq_topic, expected, 20)
    assert len(letters) == expected
    return letters


def reason(letter: Any) -> str:
    return dict(letter.headers)["dlq.error.class"].decode()


def forgeries(settings: Settings, at: datetime, keys: SigningKeys | None) -> list[Message]:
    """What a writer to the agent topics sends to act for VICTIM: a new device (a license
    more), uninstalls timed at now + 300 s (licenses released), and a newer install that
    rewrites alice's e-mail, display name and the laptop's host name."""
    soon = at + timedelta(seconds=300)
    rogue = SimulatedDevice(VICTIM, "rogue-1", None, "business")
    return [
        agent_message(settings, rogue, "install", at, keys),
        agent_message(settings, LAPTOP, "uninstall", soon, keys),
        agent_message(settings, KIOSK, "uninstall", soon, keys),
        agent_message(
            settings,
            LAPTOP,
            "install",
            soon,
            keys,
            hostname="evil-host",
            user={"email": "mallory@evil.example", "display_name": "Not Alice"},
        ),
    ]


async def test_signals_for_a_customer_the_console_never_created_license_nothing_until_replayed(
    services: Services, settings: Settings
) -> None:
    """Refuse mode, no signatures: an agent signal cannot create a billable customer. Its
    messages wait in the DLQ; once the console creates the customer, `dlq replay` licenses
    them."""
    flow = Topics(services, settings)
    created = admin_event("customer.created", VICTIM, day(0) - timedelta(hours=1))
    await flow.send([console_message(settings, created)])
    await flow.process(day(0))
    await flow.send(
        [
            agent_message(settings, LAPTOP, "install", day(0)),
            agent_message(settings, GHOST_PC, "install", day(0)),
            agent_message(settings, GHOST_PC, "heartbeat", day(0) + timedelta(minutes=5)),
        ]
    )
    await flow.process(day(0) + timedelta(minutes=10))

    assert await customers(settings) == {VICTIM}
    assert await active_licenses(settings, VICTIM) == {("user", ALICE)}
    assert await rows_of(settings, GHOST) == {table: [] for table in TABLES}
    letters = await dead_letters(services, settings, 2)
    assert [reason(letter) for letter in letters] == ["unknown_customer"] * 2
    originals = {agent_message(settings, GHOST_PC, "install", day(0))[2]}
    originals.add(agent_message(settings, GHOST_PC, "heartbeat", day(0) + timedelta(minutes=5))[2])
    assert {letter.value for letter in letters} == originals, "bytes unchanged"
    await publish_outbox(settings)
    events = await billing_view(services, settings, 1)
    assert {event["customer_id"] for event in events} == {VICTIM}

    # The console creates the customer; the operator replays the refused signals.
    await flow.send([console_message(settings, admin_event("customer.created", GHOST, day(0)))])
    await flow.process(day(0) + timedelta(minutes=10))
    environment = settings_environment(settings)
    replayed = await asyncio.to_thread(
        run_cli, environment, "dlq", "replay", "--reason", "unknown_customer"
    )
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 2 messages" in replayed.stdout
    flow.agents += 2
    await flow.process(day(0) + timedelta(minutes=10))
    assert await active_licenses(settings, GHOST) == {("user", "g@ghost.example")}
    [device] = await fetch(
        settings.database_url.get_secret_value(),
        "SELECT last_seen_at FROM devices WHERE customer_id = $1",
        GHOST,
    )
    assert device["last_seen_at"] == day(0) + timedelta(minutes=5)


async def test_admit_mode_creates_customers_from_agent_signals(
    services: Services, settings: Settings
) -> None:
    """UNKNOWN_CUSTOMERS=admit, for deployments without the console topic: today's
    behaviour, the customer is created by its first signal."""
    admitting = settings.model_copy(update={"unknown_customers": "admit"})
    flow = Topics(services, admitting)
    await flow.send([agent_message(admitting, GHOST_PC, "install", day(0))])
    await flow.process(day(0) + timedelta(minutes=5))
    assert await customers(admitting) == {GHOST}
    assert await active_licenses(admitting, GHOST) == {("user", "g@ghost.example")}
    assert await read_all(services.kafka_bootstrap_servers, admitting.dlq_topic, 1, 2) == []


async def honest_start(flow: Topics, settings: Settings) -> None:
    """The console (signed) creates VICTIM and MALLORY; the gateway (signed) forwards the
    installs of VICTIM's devices and MALLORY's PC."""
    created = [
        admin_event("customer.created", customer, day(0) - timedelta(hours=1))
        for customer in (VICTIM, MALLORY)
    ]
    await flow.send([console_message(settings, event, CONSOLE) for event in created])
    await flow.process(day(0))
    await flow.send(
        [
            agent_message(settings, device, "install", day(0), GATEWAY)
            for device in (LAPTOP, PHONE, KIOSK, MALLORY_PC)
        ]
    )
    await flow.process(day(0) + timedelta(minutes=5))
    assert await active_licenses(settings, VICTIM) == {("user", ALICE), ("device", "kiosk-1")}


async def test_with_signatures_a_forged_message_for_another_customer_changes_nothing(
    services: Services, signed_settings: Settings
) -> None:
    settings = signed_settings
    flow = Topics(services, settings)
    await honest_start(flow, settings)
    await publish_outbox(settings)
    victim_before = await rows_of(settings, VICTIM)

    now = day(0) + timedelta(hours=1)
    # Unsigned; signed with a key the gateway does not have; a key id the gateway uses with
    # another key; a valid signature of MALLORY's own message carried over to VICTIM's
    # fields; VICTIM's own signed heartbeat replayed as an uninstall; a forged console event.
    mallory_own = agent_message(settings, MALLORY_PC, "heartbeat", now, GATEWAY)
    victims_heartbeat = agent_message(settings, LAPTOP, "heartbeat", now, GATEWAY)
    uninstall_body = encode({**orjson.loads(victims_heartbeat[2]), "type": "uninstall"})
    forged = [
        *forgeries(settings, now, None),
        *forgeries(settings, now, FORGER),
        *forgeries(settings, now, SigningKeys(FORGER.keys, "gw-2026-12")),
        *[
            (topic, key, value, mallory_own[3])
            for topic, key, value, _ in forgeries(settings, now, None)
        ],
        (settings.lifecycle_topic, LAPTOP.key, uninstall_body, victims_heartbeat[3]),
        agent_message(settings, GHOST_PC, "install", now),
        console_message(settings, admin_event("customer.inactivated", VICTIM, now)),
        console_message(settings, admin_event("customer.created", GHOST, now), FORGER),
    ]
    # MALLORY's own heartbeat, signed by the gateway with the previous key: accepted.
    previous_key = agent_message(
        settings, MALLORY_PC, "heartbeat", now, GATEWAY, key_id="gw-2026-06"
    )
    await flow.send([*forged, previous_key])
    await flow.process(now + timedelta(minutes=1))

    assert await rows_of(settings, VICTIM) == victim_before
    assert await rows_of(settings, GHOST) == {table: [] for table in TABLES}
    assert await customers(settings) == {VICTIM, MALLORY}
    [mallory_seen] = await fetch(
        settings.database_url.get_secret_value(),
        "SELECT last_seen_at FROM devices WHERE customer_id = $1",
        MALLORY,
    )
    assert mallory_seen["last_seen_at"] == now, "the previous key is still accepted"
    letters = await dead_letters(services, settings, len(forged))
    assert {reason(letter) for letter in letters} == {"unauthenticated"}
    sent = {(value, tuple(headers)) for _, _, value, headers in forged}
    kept = {(letter.value, tuple(original_headers(letter))) for letter in letters}
    assert kept == sent, "original bytes and headers kept"


def original_headers(letter: Any) -> list[tuple[str, bytes]]:
    return [(name, value) for name, value in letter.headers if not name.startswith("dlq.")]


async def test_without_signatures_refuse_mode_still_admits_existing_customers_forgeries(
    services: Services, settings: Settings
) -> None:
    """The residual risk docs/security.md states: without gateway signatures, refusing
    unknown customers does not stop a writer to the agent topics acting for a customer
    that exists. Signatures close it (the test above)."""
    flow = Topics(services, settings)
    await honest_start(flow, settings)
    now = day(0) + timedelta(hours=1)
    await flow.send(forgeries(settings, now, None))
    await flow.process(now + timedelta(minutes=1))
    assert ("device", "rogue-1") in await active_licenses(settings, VICTIM)


async def test_the_simulator_signs_as_the_gateway_and_the_console_when_keys_are_set(
    services: Services, signed_settings: Settings
) -> None:
    """`license-worker simulate` with the keys files set: the worker, verifying, stores
    everything and dead-letters nothing (the reference signer and the verifier agree)."""
    settings, start = signed_settings, day(0)
    console = await produce_fleet(settings, 2, 4, 2, start, with_console=True, with_agents=False)
    await apply_admin(services, settings, start, console)
    agents = await produce_fleet(settings, 2, 4, 2, start)
    await ingest(services, settings, start + timedelta(minutes=10), agents)
    rows = await fetch(
        settings.database_url.get_secret_value(),
        "SELECT customer_id, count(*) AS devices FROM devices GROUP BY 1 ORDER BY 1",
    )
    assert [(row["customer_id"], row["devices"]) for row in rows] == [
        (simulated_customer_id(0), 4),
        (simulated_customer_id(1), 4),
    ]
    assert await read_all(services.kafka_bootstrap_servers, settings.dlq_topic, 1, 2) == []

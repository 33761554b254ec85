"""Produces a simulated fleet's events into Kafka (demo and tests).

When the worker verifies signatures (AGENT_SIGNING_KEYS_FILE, CONSOLE_SIGNING_KEYS_FILE),
the simulator signs as the agents' gateway and the console would, with each file's current
key (worker/trust/signing.py).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from worker.kafka.clients import create_producer, start_with_retry
from worker.settings import Settings
from worker.sim.fleet import agent_event, build_fleet, console_events, encode, heartbeat_rounds
from worker.trust.signing import SigningKeys, agent_signed_bytes, console_signed_bytes, sign


async def produce_fleet(
    settings: Settings,
    customers: int,
    devices_per_customer: int,
    rounds: int,
    start: datetime,
    *,
    with_console: bool = False,
    with_agents: bool = True,
) -> int:
    """Agent events of a simulated fleet and, with `with_console`, the console's messages
    for its customers first (their creation, subscriptions, a trial, a group). The worker
    refuses signals for customers the console has not created (UNKNOWN_CUSTOMERS=refuse), so
    the console's messages must have been applied before the agents' arrive: the demo sends
    them alone first (`with_agents=False`) and waits for the customers."""
    fleet = build_fleet(customers, devices_per_customer)
    producer = create_producer(settings)
    agent_keys, console_keys = settings.agent_signing_keys(), settings.console_signing_keys()
    sent = 0
    try:
        await start_with_retry("kafka-producer", producer.start, settings, attempts=5)
        if with_console:
            for message in console_events(customers, start - timedelta(minutes=2)):
                value = encode(message)
                headers = _console_headers(console_keys, value)
                key = message["customer_id"].encode()
                await producer.send(settings.admin_topic, value, key=key, headers=headers)
                sent += 1
        if not with_agents:
            await producer.flush()
            return sent
        for device in fleet:
            at = start - timedelta(minutes=1)
            event = agent_event(device, "install", at)
            headers = _agent_headers(agent_keys, event, at)
            await producer.send(
                settings.lifecycle_topic, encode(event), key=device.key, headers=headers
            )
            sent += 1
        for device, at in heartbeat_rounds(fleet, rounds, start, timedelta(minutes=5)):
            event = agent_event(device, "heartbeat", at)
            headers = _agent_headers(agent_keys, event, at)
            await producer.send(
                settings.heartbeat_topic, encode(event), key=device.key, headers=headers
            )
            sent += 1
        await producer.flush()
    finally:
        await producer.stop()
    return sent


def _agent_headers(
    keys: SigningKeys | None, event: dict[str, Any], at: datetime
) -> list[tuple[str, bytes]] | None:
    if keys is None:
        return None
    fields = (event["customer_id"], event["device_id"], event["event_id"], event["type"])
    return sign(keys, agent_signed_bytes(*fields, at))


def _console_headers(keys: SigningKeys | None, value: bytes) -> list[tuple[str, bytes]] | None:
    return None if keys is None else sign(keys, console_signed_bytes(value))

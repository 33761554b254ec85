"""Produces a simulated fleet's events into Kafka (demo and tests)."""

from __future__ import annotations

from datetime import datetime, timedelta

from worker.kafka.clients import create_producer, start_with_retry
from worker.settings import Settings
from worker.sim.fleet import agent_event, build_fleet, console_events, encode, heartbeat_rounds


async def produce_fleet(
    settings: Settings,
    customers: int,
    devices_per_customer: int,
    rounds: int,
    start: datetime,
    *,
    with_console: bool = False,
) -> int:
    """Agent events of a simulated fleet and, with `with_console`, the console's messages
    for its customers first (subscriptions, a trial, a group)."""
    fleet = build_fleet(customers, devices_per_customer)
    producer = create_producer(settings)
    sent = 0
    try:
        await start_with_retry("kafka-producer", producer.start, settings, attempts=5)
        if with_console:
            for message in console_events(customers, start - timedelta(minutes=2)):
                key = message["customer_id"].encode()
                await producer.send(settings.admin_topic, encode(message), key=key)
                sent += 1
        for device in fleet:
            event = agent_event(device, "install", start - timedelta(minutes=1))
            await producer.send(settings.lifecycle_topic, encode(event), key=device.key)
            sent += 1
        for device, at in heartbeat_rounds(fleet, rounds, start, timedelta(minutes=5)):
            event = agent_event(device, "heartbeat", at)
            await producer.send(settings.heartbeat_topic, encode(event), key=device.key)
            sent += 1
        await producer.flush()
    finally:
        await producer.stop()
    return sent

"""Signals of a customer the console created but the console's consumer group has not
applied yet (it rebalances, its replica restarts): with UNKNOWN_CUSTOMERS=refuse they wait
for the console instead of going to the DLQ (issue #15: the full fault run sent 16,796
valid signals to the DLQ that way). Real Kafka and Postgres."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import pytest
from structlog.testing import capture_logs

from tests.integration.license_support import admin_event, day
from tests.support import (
    Services,
    committed_offsets_total,
    encode,
    fetch,
    make_settings,
    produce,
    read_all,
    running_worker,
    wait_until,
)
from worker.clock import FixedClock
from worker.ops import metrics
from worker.settings import Settings
from worker.sim.fleet import SimulatedDevice, agent_event

pytestmark = pytest.mark.integration

PC = SimulatedDevice("acme", "acme-pc", "ann@acme.example", "business")


@pytest.fixture
def settings(services: Services, database_url: str, topics: dict[str, str]) -> Settings:
    return make_settings(
        services,
        database_url,
        topics,
        sweep_enabled=False,
        relay_enabled=False,
        unknown_customers="refuse",
        console_catch_up_wait_seconds=60,
    )


async def send_console(services: Services, settings: Settings, customer: str) -> None:
    event = admin_event("customer.created", customer, day(0))
    await produce(
        services.kafka_bootstrap_servers,
        settings.admin_topic,
        [(customer.encode(), encode(event))],
    )


async def send_install(services: Services, settings: Settings, at: datetime) -> None:
    await produce(
        services.kafka_bootstrap_servers,
        settings.lifecycle_topic,
        [(PC.key, encode(agent_event(PC, "install", at)))],
    )


async def devices(settings: Settings) -> list[str]:
    rows = await fetch(settings.database_url.get_secret_value(), "SELECT device_id FROM devices")
    return [row["device_id"] for row in rows]


def waiting() -> bool:
    return bool(metrics.WAITING_FOR_CONSOLE._value.get())


async def test_signals_wait_for_a_console_behind_and_are_stored_once_it_applied_them(
    services: Services, settings: Settings
) -> None:
    await send_console(services, settings, "acme")
    await send_install(services, settings, day(0))
    clock = FixedClock(day(0) + timedelta(minutes=5))
    console_off = settings.model_copy(update={"admin_enabled": False})
    with capture_logs() as logs:
        async with running_worker(console_off, clock=clock):

            async def is_waiting() -> bool:
                return waiting()

            await wait_until(is_waiting, timeout=60)
    assert "ingest.waiting_for_console" in [entry["event"] for entry in logs]
    assert await devices(settings) == []
    bootstrap = services.kafka_bootstrap_servers
    assert (
        await committed_offsets_total(
            bootstrap, settings.consumer_group, [settings.lifecycle_topic]
        )
        <= 0
    )

    # The console's consumer runs again: its customer first, then the waiting signal.
    async with running_worker(settings, clock=clock):

        async def stored() -> bool:
            return await devices(settings) == ["acme-pc"]

        await wait_until(stored, timeout=60)
    assert not waiting()
    assert await read_all(bootstrap, settings.dlq_topic, 1, 3) == []


async def test_the_wait_is_bounded_then_the_signals_go_to_the_dlq(
    services: Services, settings: Settings
) -> None:
    """A console that stays behind (here: no replica runs its consumer) holds the signals
    for CONSOLE_CATCH_UP_WAIT_SECONDS, then they go to the DLQ as before, replayable."""
    await send_console(services, settings, "other")
    await send_install(services, settings, day(0))
    bounded = settings.model_copy(
        update={"admin_enabled": False, "console_catch_up_wait_seconds": 3}
    )
    started = time.monotonic()
    with capture_logs() as logs:
        async with running_worker(bounded, clock=FixedClock(day(0) + timedelta(minutes=5))):
            letters = await read_all(services.kafka_bootstrap_servers, bounded.dlq_topic, 1, 60)
    assert time.monotonic() - started >= 3
    assert [dict(letter.headers)["dlq.error.class"] for letter in letters] == [b"unknown_customer"]
    events = [entry["event"] for entry in logs]
    assert "ingest.waiting_for_console" in events
    assert "ingest.console_wait_expired" in events
    assert await devices(settings) == []


async def test_a_console_caught_up_refuses_an_unknown_customer_at_once(
    services: Services, settings: Settings
) -> None:
    """Every console message applied: a customer still not in the database was never
    created, and its signals go to the DLQ without waiting."""
    await send_console(services, settings, "other")
    clock = FixedClock(day(0) + timedelta(minutes=5))
    with capture_logs() as logs:
        async with running_worker(settings, clock=clock):

            async def console_applied() -> bool:
                total = await committed_offsets_total(
                    services.kafka_bootstrap_servers,
                    settings.admin_consumer_group,
                    [settings.admin_topic],
                )
                return total >= 1

            await wait_until(console_applied, timeout=60)
            await send_install(services, settings, day(0))
            letters = await read_all(services.kafka_bootstrap_servers, settings.dlq_topic, 1, 60)
    assert [dict(letter.headers)["dlq.error.class"] for letter in letters] == [b"unknown_customer"]
    assert "ingest.waiting_for_console" not in [entry["event"] for entry in logs]

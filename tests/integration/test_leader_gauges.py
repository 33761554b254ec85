"""Gauges only the sweeper or relay leader knows are true from its election and withdrawn
when it stops leading (issue #16 part 3), against the real broker and database."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from prometheus_client import REGISTRY

from tests.integration.license_support import day, ingest, send, sweeper_at
from tests.support import Services, make_settings, wait_until
from worker.db.leases import Leadership
from worker.licensing.relay import publish_pending_once
from worker.licensing.sweeper import Sweeper
from worker.settings import Settings
from worker.sim.fleet import SimulatedDevice

pytestmark = pytest.mark.integration

USER_LICENSES = {"subject_type": "user", "basis": "user"}


@pytest.fixture
def settings(services: Services, database_url: str, topics: dict[str, str]) -> Settings:
    return make_settings(services, database_url, topics, sweep_enabled=False)


async def test_sweeper_gauges_from_the_election_and_withdrawn_after(
    services: Services, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    devices = [SimulatedDevice("acme", f"d-{i}", f"u-{i}@acme.example", "business") for i in (1, 2)]
    total = await send(services, settings, [(d, "install", day(0)) for d in devices])
    await ingest(services, settings, day(0) + timedelta(minutes=1), total)

    first_pass_started = asyncio.Event()

    async def a_pass_that_takes_long(self: Sweeper) -> None:
        first_pass_started.set()
        await asyncio.sleep(3600)  # a first pass over a large fleet

    monkeypatch.setattr(Sweeper, "_run_logged", a_pass_that_takes_long)
    async with sweeper_at(settings, day(0) + timedelta(minutes=2)) as sweeper:
        leading = asyncio.create_task(sweeper.run_forever())
        await asyncio.wait_for(first_pass_started.wait(), timeout=30)
        # Before the first pass ends, the leader already tells the truth.
        assert REGISTRY.get_sample_value("license_worker_licenses_active", USER_LICENSES) == 2
        assert REGISTRY.get_sample_value("license_worker_customers_licensed") == 1
        sweeper._stopping.set()
        leading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leading
    # No longer leading: no stale figures left behind.
    assert REGISTRY.get_sample_value("license_worker_licenses_active", USER_LICENSES) is None
    assert REGISTRY.get_sample_value("license_worker_customers_licensed") is None
    assert REGISTRY.get_sample_value("license_worker_sweep_ingestion_lag_seconds") is None


async def test_relay_gauges_are_withdrawn_on_a_replica_that_does_not_relay(
    services: Services, settings: Settings
) -> None:
    await publish_pending_once(settings)
    assert REGISTRY.get_sample_value("license_worker_outbox_pending") == 0
    # Another replica holds the relay lease: this one's figures are withdrawn, not kept.
    async with sweeper_at(settings, day(0)) as sweeper:
        repository = sweeper._repository
        async with Leadership(repository, "relay", "another-replica", 30.0) as another:
            assert await another.acquire() is not None
            assert await publish_pending_once(settings) == 0

            async def withdrawn() -> bool:
                return REGISTRY.get_sample_value("license_worker_outbox_pending") is None

            await wait_until(withdrawn, timeout=5)
        assert REGISTRY.get_sample_value("license_worker_outbox_oldest_age_seconds") is None

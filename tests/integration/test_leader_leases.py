"""The sweeper's and the relay's leader leases (issue #15 part 2; worker/db/leases.py), on real
Postgres: contenders never act at once, a dead leader's lease is taken over once it expired,
and a stale leader (its lease expired and taken by another) does not act, even while it still
believes it leads."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from tests.integration.license_support import (
    ALICE_DEVICES,
    KIOSK,
    day,
    ingest,
    send,
    sweeper_at,
)
from tests.support import Services, fetchval, make_settings, read_all
from worker.db.leases import Leadership, Lease, LeaseLost
from worker.db.repository import Repository
from worker.kafka.clients import create_producer
from worker.licensing.relay import Relay
from worker.settings import Settings

pytestmark = pytest.mark.integration

LEASE_SECONDS = 1.0


@contextlib.asynccontextmanager
async def repository_for(database_url: str, size: int = 4) -> AsyncIterator[Repository]:
    repository = await Repository.connect(database_url, size)
    try:
        yield repository
    finally:
        await repository.close()


def believes_it_leads(lease: Lease) -> None:
    """A leader that cannot tell time passed (a paused process, a stalled event loop): its
    local guard says it still holds the lease; only the database's check is left."""
    lease.valid_until = asyncio.get_running_loop().time() + 3600


async def stale_lease(repository: Repository, name: str) -> tuple[Lease, Lease]:
    """A lease this replica took and stopped renewing, that expired and another replica took
    since (returned second); the stale holder still believes it leads."""
    stale = Lease(name, "stale-replica", LEASE_SECONDS)
    assert await repository.take_lease(stale)
    await asyncio.sleep(LEASE_SECONDS + 0.2)
    successor = Lease(name, "new-replica", 30.0)
    assert await repository.take_lease(successor)
    believes_it_leads(stale)
    return stale, successor


async def test_contenders_never_act_at_once_even_when_a_leader_stalls(database_url: str) -> None:
    """Three contenders for one lease, each acting in fenced transactions; now and then the
    leader stalls past the lease's expiry (renewal stopped, still believing it leads). The
    intervals in which each acted never overlap another holder's."""
    acted: list[tuple[str, float, float]] = []
    refused = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 8
    rng = random.Random(15)

    async def contend(holder: str, repository: Repository) -> None:
        nonlocal refused
        async with Leadership(repository, "relay", holder, LEASE_SECONDS) as leadership:
            while loop.time() < deadline:
                lease = await leadership.acquire()
                if lease is None:
                    await asyncio.sleep(0.05)
                    continue
                work = repository.fenced(lease)
                try:
                    for _ in range(rng.randint(2, 6)):
                        async with work.transaction() as session:
                            started = loop.time()
                            await session.fetch("summary")
                            await asyncio.sleep(0.05)
                            acted.append((holder, started, loop.time()))
                    if rng.random() < 0.5:
                        # Stalls: stops renewing and sleeps past the expiry, then acts on.
                        leadership._stop_renewing()
                        await asyncio.sleep(LEASE_SECONDS + 0.3)
                        believes_it_leads(lease)
                        async with work.transaction() as session:
                            acted.append((holder, loop.time(), loop.time()))
                except LeaseLost:
                    refused += 1

    async with contextlib.AsyncExitStack() as stack:
        repositories = [
            await stack.enter_async_context(repository_for(database_url)) for _ in range(3)
        ]
        await asyncio.gather(*(contend(f"contender-{i}", r) for i, r in enumerate(repositories)))

    for holder, started, ended in acted:
        for other, other_started, other_ended in acted:
            if other != holder:
                assert ended <= other_started or other_ended <= started, "acted at once"
    assert len({holder for holder, _, _ in acted}) >= 2, "the lease changed hands"
    assert refused >= 1, "a stalled leader was refused"


async def test_a_dead_leaders_lease_is_taken_over_after_it_expired(database_url: str) -> None:
    async with repository_for(database_url) as repository:
        dead = Lease("sweeper", "dead-replica", LEASE_SECONDS)
        assert await repository.take_lease(dead)  # then dies: never renews, never releases
        successor = Leadership(repository, "sweeper", "successor", 30.0)
        try:
            assert await successor.acquire() is None, "not before the lease expired"
            await asyncio.sleep(LEASE_SECONDS + 0.2)
            lease = await successor.acquire()
            assert lease is not None
            assert lease.token == (dead.token or 0) + 1, "a new holder, a new token"
        finally:
            await successor.close()
        # Given up on close: the next replica need not wait for the expiry.
        assert await repository.take_lease(Lease("sweeper", "next", 30.0))


async def test_a_leader_that_stops_gives_its_lease_up_at_once(database_url: str) -> None:
    async with repository_for(database_url) as repository:
        async with Leadership(repository, "relay", "first", 30.0) as first:
            assert await first.acquire() is not None
            other = Leadership(repository, "relay", "second", 30.0)
            assert await other.acquire() is None
        assert await other.acquire() is not None
        await other.close()


async def test_a_leader_renews_its_lease_and_keeps_it(database_url: str) -> None:
    async with (
        repository_for(database_url) as repository,
        Leadership(repository, "relay", "leader", LEASE_SECONDS) as leader,
    ):
        lease = await leader.acquire()
        assert lease is not None
        await asyncio.sleep(LEASE_SECONDS * 2.5)  # renewed every third of it
        assert lease.held
        assert not await repository.take_lease(Lease("relay", "other", 30.0))
        async with repository.fenced(lease).transaction() as session:
            await session.fetch("summary")


@pytest.fixture
def settings(services: Services, database_url: str, topics: dict[str, str]) -> Settings:
    return make_settings(
        services,
        database_url,
        topics,
        sweep_enabled=False,
        relay_enabled=False,
        leader_lease_seconds=LEASE_SECONDS,
    )


async def test_a_stale_sweeper_releases_nothing(
    services: Services, settings: Settings, database_url: str
) -> None:
    total = await send(services, settings, [(d, "install", day(0)) for d in ALICE_DEVICES])
    await ingest(services, settings, day(0) + timedelta(minutes=1), total)
    active = "SELECT count(*) FROM licenses WHERE active"
    assert await fetchval(database_url, active) == 2  # alice and her watch over allowance

    async with sweeper_at(settings, day(45)) as sweeper:
        repository = sweeper._repository
        stale, successor = await stale_lease(repository, "sweeper")
        sweeper._work_on(repository.fenced(stale))
        with pytest.raises(LeaseLost):
            await sweeper._run(dry_run=False)
        assert await fetchval(database_url, active) == 2, "the stale leader released nothing"
        assert await fetchval(database_url, "SELECT count(*) FROM sweep_state") == 0

        # The same pass by the lease's holder releases them: the refusal was the lease's.
        await repository.release_lease(successor)
        assert (await sweeper.run_once()).released == 2
    assert await fetchval(database_url, active) == 0


async def test_a_stale_relay_publishes_nothing(
    services: Services, settings: Settings, database_url: str
) -> None:
    devices = [*ALICE_DEVICES, KIOSK]
    total = await send(services, settings, [(d, "install", day(0)) for d in devices])
    await ingest(services, settings, day(0), total)
    pending = "SELECT count(*) FROM license_outbox WHERE published_at IS NULL"
    assert await fetchval(database_url, pending) == 3

    async with repository_for(database_url) as repository:
        producer = create_producer(settings)
        await producer.start()
        try:
            relay = Relay(settings, repository, producer)
            relay._leadership.lease, successor = await stale_lease(repository, "relay")
            assert await relay.publish_pending() == 0
            assert await fetchval(database_url, pending) == 3
            topic = settings.license_events_topic
            assert await read_all(services.kafka_bootstrap_servers, topic, 1, timeout=3) == []

            await repository.release_lease(successor)
            assert await relay.publish_pending() == 3, "published once the lease is its"
            await relay.close()
        finally:
            await producer.stop()
    assert await fetchval(database_url, pending) == 0

"""Writes and license decisions that meet on the same user: several replicas' batches (each
partition holds some of a user's devices), the sweeper and late events, against the real
database and broker."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from schemas import AGENT_EVENT_ADAPTER
from tests.integration.license_support import day, ingest, sweep
from tests.support import (
    Services,
    encode,
    fetch,
    fetchval,
    make_settings,
    produce,
    wait_until,
)
from worker.db.errors import is_transient_database_error
from worker.db.repository import Repository
from worker.ingest.coalesce import AgentEventModel, coalesce
from worker.licensing.decisions import Group, decide_groups, device_facts, groups_of_devices
from worker.licensing.rules import SubjectType, desired_licenses
from worker.settings import Settings
from worker.sim.fleet import SimulatedDevice, agent_event

pytestmark = pytest.mark.integration

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
WINDOW = timedelta(days=30)
EVENT_KEY = bytes(range(32))
TOLERANCE = timedelta(minutes=5)
_event_numbers = itertools.count()


@pytest.fixture
def settings(services: Services, database_url: str, topics: dict[str, str]) -> Settings:
    return make_settings(
        services, database_url, topics, sweep_enabled=False, relay_poll_seconds=0.1
    )


def agent(
    event_type: str, device: str, at: datetime, user: str | None = None, **fields: Any
) -> AgentEventModel:
    """An agent event; `user` None leaves user_id out (an uninstall, a bare heartbeat)."""
    document: dict[str, Any] = {
        "schema_version": 1,
        "event_id": f"evt-{next(_event_numbers)}",
        "type": event_type,
        "customer_id": "acme",
        "device_id": device,
        "occurred_at": at.isoformat(),
        **fields,
    }
    if user is not None:
        document["user_id"] = user
    if event_type == "install":
        document |= {"device_kind": "business", "hostname": "h", "os": "linux"}
    return AGENT_EVENT_ADAPTER.validate_python(document)


async def write(repository: Repository, events: Iterable[AgentEventModel], now: datetime) -> None:
    """One batch as the ingestion loop writes it: signals, then the decisions they cause."""
    changes = coalesce(events, now, TOLERANCE)
    async with repository.transaction() as session:
        result = await session.write_signals(changes, [], now - WINDOW)
        groups = groups_of_devices(
            (d.customer_id, d.device_id, d.user_id, d.previous_user_id)
            for d in result.license_relevant
        )
        await decide_groups(session, groups, now, now, WINDOW, event_key=EVENT_KEY)


async def test_a_user_last_seen_is_the_newest_of_several_devices_signals_in_one_batch(
    database_url: str,
) -> None:
    users = [f"user-{number:03d}" for number in range(200)]
    repository = await Repository.connect(database_url, 2)
    try:
        installs = [agent("install", f"{u}-{x}", T0, u) for u in users for x in "ab"]
        await write(repository, installs, T0 + timedelta(hours=3))
        uninstalls = [agent("uninstall", f"{u}-a", T0 + timedelta(hours=1)) for u in users]
        uninstalls += [agent("uninstall", f"{u}-b", T0 + timedelta(hours=2)) for u in users]
        await write(repository, uninstalls, T0 + timedelta(hours=3))
    finally:
        await repository.close()
    rows = await fetch(database_url, "SELECT user_id, last_seen_at FROM users")
    behind = sorted(r["user_id"] for r in rows if r["last_seen_at"] != T0 + timedelta(hours=2))
    assert len(rows) == 200
    assert behind == []


async def active_licenses(database_url: str) -> dict[str, str]:
    rows = await fetch(
        database_url, "SELECT subject_id, basis FROM licenses WHERE active ORDER BY subject_id"
    )
    return {row["subject_id"]: row["basis"] for row in rows}


async def test_a_late_older_install_moves_the_over_allowance_license_to_the_newer_device(
    services: Services, settings: Settings
) -> None:
    """The covered business device is the earliest first seen: a late install that makes
    another device the earliest moves the over-allowance license."""
    laptop = SimulatedDevice("acme", "bob-laptop", "bob@acme.example", "business")
    desktop = SimulatedDevice("acme", "bob-desktop", "bob@acme.example", "business")

    def heartbeat(device: SimulatedDevice, at: datetime) -> tuple[bytes, bytes]:
        # The kind is known from the start: only the first sighting changes later.
        return device.key, encode(
            agent_event(device, "heartbeat", at) | {"device_kind": "business"}
        )

    bootstrap, topic = services.kafka_bootstrap_servers, settings.heartbeat_topic
    total = await produce(bootstrap, topic, [heartbeat(laptop, day(0) + timedelta(minutes=10))])
    total += await produce(bootstrap, topic, [heartbeat(desktop, day(0) + timedelta(minutes=5))])
    await ingest(services, settings, day(0) + timedelta(minutes=15), total)
    assert await active_licenses(settings.database_url.get_secret_value()) == {
        "bob@acme.example": "user",
        "bob-laptop": "over_allowance",
    }

    late_install = encode(agent_event(laptop, "install", day(0)))
    total += await produce(bootstrap, settings.lifecycle_topic, [(laptop.key, late_install)])
    await ingest(services, settings, day(0) + timedelta(minutes=20), total)

    url = settings.database_url.get_secret_value()
    assert await active_licenses(url) == {
        "bob@acme.example": "user",
        "bob-desktop": "over_allowance",
    }
    [released] = await fetch(
        url, "SELECT release_reason FROM licenses WHERE subject_id = 'bob-laptop'"
    )
    assert released["release_reason"] == "covered_by_user"


# Replicas' batches: each writer holds one device of every user (its partition's), so that
# each batch touches all users through a different set of devices.
USERS = [f"user-{number:02d}" for number in range(40)]
WRITERS = "abc"
ROUNDS = 8


def device_of(user: str, writer: str) -> str:
    return f"{user}-{writer}"


def round_events(round_number: int, writer: str) -> list[AgentEventModel]:
    """Uninstalls on odd rounds, bare heartbeats (a reinstall) on even ones: every event
    changes a license (protection) and is credited to the user through the device."""
    at = T0 + timedelta(minutes=round_number, seconds=WRITERS.index(writer))
    event_type = "uninstall" if round_number % 2 else "heartbeat"
    return [agent(event_type, device_of(user, writer), at) for user in USERS]


async def write_retrying(
    repository: Repository, events: list[AgentEventModel], now: datetime, deadlocks: list[str]
) -> None:
    while True:
        try:
            await write(repository, events, now)
            return
        except asyncpg.DeadlockDetectedError as error:
            deadlocks.append(str(error))
        except Exception as error:  # a serialization failure is retried like the worker does
            if not is_transient_database_error(error):
                raise


async def sweep_decisions(
    repository: Repository, now: datetime, done: asyncio.Event, deadlocks: list[str]
) -> None:
    """The sweeper's decision path (`decide_groups` for every user) in a loop."""
    groups = [Group("acme", SubjectType.USER, user) for user in reversed(USERS)]
    while not done.is_set():
        try:
            async with repository.transaction() as session:
                await decide_groups(session, groups, now, now, WINDOW, event_key=EVENT_KEY)
        except asyncpg.DeadlockDetectedError as error:
            deadlocks.append(str(error))
        await asyncio.sleep(0)


async def database_deadlocks(superuser_url: str) -> int:
    return int(
        await fetchval(
            superuser_url,
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
        )
    )


async def test_concurrent_replicas_and_the_sweeper_never_deadlock(
    services: Services, database_url: str
) -> None:
    superuser_url = services.superuser_url(database_url)
    deadlocks_before = await database_deadlocks(superuser_url)
    now = T0 + timedelta(hours=1)
    deadlocks: list[str] = []
    repository = await Repository.connect(database_url, 8)
    try:
        installs = [agent("install", device_of(u, w), T0, u) for u in USERS for w in WRITERS]
        await write(repository, installs, now)
        done = asyncio.Event()
        sweeper = asyncio.create_task(sweep_decisions(repository, now, done, deadlocks))
        for round_number in range(1, ROUNDS + 1):
            await asyncio.gather(
                *(
                    write_retrying(repository, round_events(round_number, w), now, deadlocks)
                    for w in WRITERS
                )
            )
        done.set()
        await sweeper
        await assert_licenses_follow_the_rules(database_url, now)
    finally:
        with contextlib.suppress(Exception):
            await repository.close()
    # A backend reports its statistics when it exits at the latest: the pool is closed.
    await asyncio.sleep(0.5)
    assert deadlocks == []
    assert await database_deadlocks(superuser_url) == deadlocks_before


async def test_a_reinstall_written_while_another_replica_writes_the_uninstall_keeps_the_license(
    database_url: str,
) -> None:
    now = T0 + timedelta(hours=3)
    repository = await Repository.connect(database_url, 2)
    try:
        await write(repository, [agent("install", "kiosk", T0)], now)
        uninstall = agent("uninstall", "kiosk", T0 + timedelta(hours=1))
        heartbeat = agent("heartbeat", "kiosk", T0 + timedelta(hours=2))
        async with repository.transaction() as session:  # the replica with the lifecycle topic
            result = await session.write_signals(coalesce([uninstall], now, TOLERANCE), [], T0)
            groups = groups_of_devices(
                (d.customer_id, d.device_id, d.user_id, d.previous_user_id)
                for d in result.license_relevant
            )
            await decide_groups(session, groups, now, now, WINDOW, event_key=EVENT_KEY)
            reinstall = asyncio.create_task(write(repository, [heartbeat], now))

            async def reinstall_waits() -> bool:
                waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                return bool(await fetchval(database_url, waiting))

            await wait_until(reinstall_waits, timeout=10)
        await reinstall
    finally:
        await repository.close()
    [device] = await fetch(database_url, "SELECT protected FROM devices")
    assert device["protected"], "heard from after its uninstall"
    assert await active_licenses(database_url) == {"kiosk": "unassigned"}


async def assert_licenses_follow_the_rules(database_url: str, now: datetime) -> None:
    """Whatever order the writers committed in, the last decision saw every device."""
    rows = await fetch(
        database_url,
        "SELECT device_id, user_id, device_kind, protected, first_seen_at, last_seen_at "
        "FROM devices",
    )
    devices = [device_facts(dict(r)) for r in rows]
    wanted = desired_licenses(devices, "user", now, WINDOW)
    expected = {subject_id: basis.value for (_, subject_id), basis in wanted.items()}
    assert await active_licenses(database_url) == expected


@pytest.mark.parametrize(
    "holder",
    [
        "SELECT 1 FROM users WHERE user_id = 'ann' FOR NO KEY UPDATE",  # a batch deciding Ann
        "SELECT 1 FROM customers WHERE customer_id = 'acme' FOR UPDATE",  # a console change
    ],
)
async def test_the_purge_skips_what_another_transaction_holds_and_purges_it_later(
    settings: Settings, database_url: str, holder: str
) -> None:
    """The purge never waits for a lock (it takes them out of the common order): a user or
    customer held by someone else is left for the next pass. (The daily usage snapshot does
    wait for a console change, holding nothing else: it is off here.)"""
    settings = settings.model_copy(update={"usage_snapshots_enabled": False})
    repository = await Repository.connect(database_url, 2)
    try:
        await write(repository, [agent("install", "ann-laptop", day(0), "ann")], day(0))
    finally:
        await repository.close()
    assert (await sweep(settings, day(31))).released == 1
    holding = await asyncpg.connect(database_url)
    try:
        async with holding.transaction():
            await holding.execute(holder)
            skipped = await asyncio.wait_for(sweep(settings, day(122)), timeout=30)
    finally:
        await holding.close()
    assert skipped.purged == 0
    assert (await sweep(settings, day(122))).purged == 1
    assert await fetch(database_url, "SELECT 1 FROM users WHERE user_id = 'ann'") == []


async def lock_waiters(superuser_url: str) -> int:
    """Backends of this database waiting for a lock."""
    return int(
        await fetchval(
            superuser_url,
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
    )


async def test_a_user_created_by_another_batch_meanwhile_is_never_locked_out_of_order(
    services: Services, database_url: str
) -> None:
    """Batch A names a new user u-a and a stored one u-b. Found in the fault run (1 in 183,173
    events): A locked u-b in key order while u-a did not exist yet, then another transaction
    created u-a, and batch B locked u-a then waited for u-b; A's user upsert then took u-a
    out of order, behind B: a deadlock. New users are now inserted in key order before any
    user row is locked, so A holds u-a before it waits for anything."""
    superuser_url = services.superuser_url(database_url)
    deadlocks_before = await database_deadlocks(superuser_url)
    now = T0 + timedelta(hours=1)
    repository = await Repository.connect(database_url, 4)
    holder = await asyncpg.connect(superuser_url)
    tasks: list[asyncio.Task[Any]] = []
    try:
        await write(repository, [agent("install", "dev-b1", T0, "u-b")], now)
        holder_transaction = holder.transaction()
        await holder_transaction.start()
        await holder.execute("SELECT FROM users WHERE user_id = 'u-b' FOR UPDATE")

        batch_a = [agent("install", "dev-a1", T0, "u-a"), agent("heartbeat", "dev-b2", T0, "u-b")]
        tasks.append(asyncio.create_task(write(repository, batch_a, now)))
        await wait_until(lambda: _waiters_at_least(superuser_url, 1), timeout=20)
        tasks.append(
            asyncio.create_task(
                fetch(
                    superuser_url,
                    "INSERT INTO users (customer_id, user_id, first_seen_at, last_seen_at) "
                    "VALUES ('acme', 'u-a', $1, $1) ON CONFLICT DO NOTHING",
                    T0,
                )
            )
        )
        await asyncio.sleep(0.5)
        batch_b = [agent("install", "dev-a2", T0, "u-a"), agent("heartbeat", "dev-b3", T0, "u-b")]
        tasks.append(asyncio.create_task(write(repository, batch_b, now)))
        await wait_until(lambda: _waiters_at_least(superuser_url, 2), timeout=20)
        await asyncio.sleep(0.5)
        await holder_transaction.rollback()
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    finally:
        for task in tasks:
            task.cancel()
        await holder.close()
        await repository.close()
    assert [o for o in outcomes if isinstance(o, BaseException)] == []
    assert await database_deadlocks(superuser_url) == deadlocks_before
    devices = await fetch(database_url, "SELECT device_id, user_id FROM devices ORDER BY 1")
    assert [(d["device_id"], d["user_id"]) for d in devices] == [
        ("dev-a1", "u-a"),
        ("dev-a2", "u-a"),
        ("dev-b1", "u-b"),
        ("dev-b2", "u-b"),
        ("dev-b3", "u-b"),
    ]


async def _waiters_at_least(superuser_url: str, count: int) -> bool:
    return await lock_waiters(superuser_url) >= count

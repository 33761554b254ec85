"""A package change of a held license reaches billing as `license.package_changed` (issue #18,
part 2), on real Kafka and Postgres: console changes (a group membership, a subscription
attached or cancelled) move held licenses between packages; the event is the subject's next
number, never follows a pending allocation, and reconciliation agrees afterwards."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import orjson
import pytest

from tests.integration.license_support import admin_event, day, publish_outbox
from tests.integration.test_subscriptions import (
    ACME,
    ANN,
    ANN_USER,
    BOB,
    BOB_USER,
    CARL,
    CARL_USER,
    KIOSK,
    Agents,
    Console,
    member,
    subscription,
)
from tests.support import Services, fetch, make_settings, run_cli, settings_environment
from worker.clock import FixedClock
from worker.db.repository import Repository
from worker.kafka.clients import read_until_end
from worker.licensing.erasure_rules import ErasureTarget, Scope
from worker.licensing.erasures import Erasures
from worker.licensing.reconcile import reconcile_subjects
from worker.settings import Settings
from worker.sim.fleet import SimulatedDevice

pytestmark = pytest.mark.integration

PACKAGE_CHANGED = "license.package_changed"
SETTLE = timedelta(seconds=300)
BOB_PHONE = SimulatedDevice(ACME, "bob-phone", BOB_USER, "personal")


@pytest.fixture
def settings(services: Services, database_url: str, topics: dict[str, str]) -> Settings:
    return make_settings(
        services, database_url, topics, sweep_enabled=False, relay_poll_seconds=0.1
    )


async def topic_events(settings: Settings) -> list[dict[str, Any]]:
    """Every license event on the topic up to its end, each event id once (as billing)."""
    seen: dict[str, dict[str, Any]] = {}
    async for record in read_until_end(settings, settings.license_events_topic):
        event = orjson.loads(record.value)
        seen.setdefault(event["event_id"], event)
    return list(seen.values())


def trail(events: list[dict[str, Any]], subject_id: str) -> list[tuple[Any, ...]]:
    """A subject's license events by number: type, previous package, package, number."""
    return [
        (e["type"], e.get("previous_package"), e["package"], e["sequence"])
        for e in sorted(
            (e for e in events if e.get("subject_id") == subject_id and "sequence" in e),
            key=lambda e: e["sequence"],
        )
        if e["type"].startswith("license.")
    ]


async def reconciled(settings: Settings) -> list[str]:
    repository = await Repository.connect(settings.database_url.get_secret_value(), 1)
    try:
        result = await reconcile_subjects(settings, repository)
    finally:
        await repository.close()
    assert (result.pending, result.unreadable_events) == (0, 0)
    return [m.describe() for m in result.mismatches]


async def outbox(settings: Settings, subject_id: str) -> list[tuple[str, int, str | None]]:
    rows = await fetch(
        settings.database_url.get_secret_value(),
        "SELECT payload::text AS payload FROM license_outbox WHERE subject_id = $1 ORDER BY id",
        subject_id,
    )
    events = [orjson.loads(row["payload"]) for row in rows]
    return [(e["type"], e["sequence"], e["package"]) for e in events]


async def test_a_user_moving_into_a_core_plus_group_gets_one_package_changed_event(
    services: Services, settings: Settings
) -> None:
    console, agents = Console(services, settings), Agents(services, settings)
    await console.send(
        day(0),
        subscription("s-core", "core", day(0)),
        subscription("s-plus", "core_plus", day(0), group_id="admins"),
    )
    await agents.send(day(0) + timedelta(minutes=10), (BOB, "install", day(0)))
    await console.send(day(1), member("admins", BOB_USER, day(1)))
    await publish_outbox(settings)

    events = await topic_events(settings)
    [changed] = [e for e in events if e["type"] == PACKAGE_CHANGED]
    assert changed == {
        "schema_version": 1,
        "event_id": changed["event_id"],
        "type": PACKAGE_CHANGED,
        "customer_id": ACME,
        "subject_type": "user",
        "subject_id": BOB_USER,
        "reason": "subscription_changed",
        "basis": "user",
        "package": "core_plus",
        "previous_package": "core",
        # The console change's decision, after the allocation (day 0).
        "effective_at": day(1).isoformat(),
        "emitted_at": day(1).isoformat(),
        "sequence": 2,
    }
    assert trail(events, BOB_USER) == [
        ("license.allocated", None, "core", 1),
        (PACKAGE_CHANGED, "core", "core_plus", 2),
    ]
    [row] = await fetch(
        settings.database_url.get_secret_value(),
        "SELECT active, package, event_sequence FROM licenses WHERE subject_id = $1",
        BOB_USER,
    )
    assert tuple(row) == (True, "core_plus", 2)
    [history] = await fetch(
        settings.database_url.get_secret_value(),
        "SELECT reason, event_id::text FROM license_history "
        "WHERE subject_id = $1 AND change = 'package_changed'",
        BOB_USER,
    )
    assert tuple(history) == ("subscription_changed", changed["event_id"])

    agreed = await asyncio.to_thread(run_cli, settings_environment(settings), "reconcile")
    assert agreed.returncode == 0, agreed.stdout + agreed.stderr
    assert "billing's view agrees" in agreed.stdout


async def test_attaching_and_cancelling_a_customer_subscription_moves_every_held_license(
    services: Services, settings: Settings
) -> None:
    console, agents = Console(services, settings), Agents(services, settings)
    await console.send(day(0), admin_event("customer.created", ACME, day(0), name="Acme"))
    await agents.send(
        day(0) + timedelta(minutes=10), *[(d, "install", day(0)) for d in (ANN, KIOSK)]
    )
    await console.send(day(1), subscription("s-core", "core", day(1)))
    await console.send(
        day(2),
        admin_event(
            "subscription.status_changed",
            ACME,
            day(2),
            subscription_id="s-core",
            status="cancelled",
        ),
    )
    await publish_outbox(settings)

    events = await topic_events(settings)
    for subject_id in (ANN_USER, KIOSK.device_id):
        assert trail(events, subject_id) == [
            ("license.allocated", None, None, 1),
            (PACKAGE_CHANGED, None, "core", 2),
            (PACKAGE_CHANGED, "core", None, 3),
        ]
    changes = [e for e in events if e["type"] == PACKAGE_CHANGED]
    assert {(e["subject_type"], e["basis"], e["effective_at"]) for e in changes} == {
        ("user", "user", day(1).isoformat()),
        ("device", "unassigned", day(1).isoformat()),
        ("user", "user", day(2).isoformat()),
        ("device", "unassigned", day(2).isoformat()),
    }
    assert await reconciled(settings) == []


async def test_a_released_license_changes_no_package(
    services: Services, settings: Settings
) -> None:
    console, agents = Console(services, settings), Agents(services, settings)
    await console.send(
        day(0),
        subscription("s-core", "core", day(0)),
        subscription("s-plus", "core_plus", day(0), group_id="admins"),
    )
    await agents.send(day(0) + timedelta(minutes=10), (CARL, "install", day(0)))
    await agents.send(day(1), (CARL, "uninstall", day(1) - timedelta(hours=1)))
    await console.send(day(2), member("admins", CARL_USER, day(2)))
    await publish_outbox(settings)

    events = await topic_events(settings)
    assert trail(events, CARL_USER) == [
        ("license.allocated", None, "core", 1),
        ("license.released", None, "core", 2),
    ]
    [row] = await fetch(
        settings.database_url.get_secret_value(),
        "SELECT active, package, event_sequence FROM licenses WHERE subject_id = $1",
        CARL_USER,
    )
    assert tuple(row) == (False, "core", 2)
    assert await reconciled(settings) == []


async def test_a_late_uninstall_older_than_the_package_change_releases_at_the_change(
    services: Services, settings: Settings
) -> None:
    """The one rule for effective times: the release follows the package change."""
    console, agents = Console(services, settings), Agents(services, settings)
    await console.send(
        day(0),
        subscription("s-core", "core", day(0)),
        subscription("s-plus", "core_plus", day(0), group_id="admins"),
    )
    await agents.send(day(0) + timedelta(minutes=10), (BOB, "install", day(0)))
    await console.send(day(2), member("admins", BOB_USER, day(2)))
    # Uninstalled on day 1, reported on day 3.
    await agents.send(day(3), (BOB, "uninstall", day(1)))
    await publish_outbox(settings)

    events = await topic_events(settings)
    bob = sorted((e for e in events if e["subject_id"] == BOB_USER), key=lambda e: e["sequence"])
    assert [(e["type"], e["sequence"], e["effective_at"]) for e in bob] == [
        ("license.allocated", 1, day(0).isoformat()),
        (PACKAGE_CHANGED, 2, day(2).isoformat()),
        ("license.released", 3, day(2).isoformat()),
    ]
    assert bob[-1]["package"] == "core_plus"
    assert await reconciled(settings) == []


# --- the settle window ------------------------------------------------------------------------


@pytest.fixture
def settling(services: Services, database_url: str, topics: dict[str, str]) -> Settings:
    return make_settings(
        services,
        database_url,
        topics,
        sweep_enabled=False,
        allocation_settle_seconds=SETTLE.total_seconds(),
        # The tests publish with the relay's clock they choose.
        relay_enabled=False,
    )


async def test_a_package_change_while_the_allocation_settles_re_decides_the_allocation(
    services: Services, settling: Settings
) -> None:
    """No package_changed outbox row ever follows a pending allocation: the withdrawal
    (migration 0011) deletes only the allocation's own row, so one would be left behind."""
    console, agents = Console(services, settling), Agents(services, settling)
    await console.send(
        day(0),
        subscription("s-core", "core", day(0)),
        subscription("s-plus", "core_plus", day(0), group_id="admins"),
    )
    decided = day(0) + timedelta(minutes=10)
    await agents.send(decided, (BOB, "install", day(0)))
    assert await outbox(settling, BOB_USER) == [("license.allocated", 1, "core")]

    await console.send(decided + timedelta(minutes=1), member("admins", BOB_USER, day(0)))
    assert await outbox(settling, BOB_USER) == [("license.allocated", 1, "core_plus")]
    history = await fetch(
        settling.database_url.get_secret_value(),
        "SELECT change, package FROM license_history WHERE subject_id = $1 ORDER BY id",
        BOB_USER,
    )
    assert [tuple(r) for r in history] == [("allocated", "core_plus")]

    await publish_outbox(settling, decided + timedelta(minutes=1) + SETTLE)
    events = await topic_events(settling)
    assert trail(events, BOB_USER) == [("license.allocated", None, "core_plus", 1)]
    assert await reconciled(settling) == []


async def test_a_package_change_after_a_settled_allocation_is_never_withdrawn_with_it(
    services: Services, settling: Settings
) -> None:
    """A decision on a clock at which the allocation has settled writes the package change
    after it; the relay holds the change behind the allocation until that settles on its own
    clock, and a decision on an earlier clock (another replica) neither withdraws the
    allocation nor re-decides it."""
    console, agents = Console(services, settling), Agents(services, settling)
    await console.send(
        day(0),
        subscription("s-core", "core", day(0)),
        subscription("s-plus", "core_plus", day(0), group_id="admins"),
    )
    decided = day(0) + timedelta(minutes=10)
    await agents.send(decided, (BOB, "install", day(0)))
    await console.send(decided + SETTLE, member("admins", BOB_USER, day(0)))
    # Decided on a clock at which the allocation has settled: the change follows it.
    assert await outbox(settling, BOB_USER) == [
        ("license.allocated", 1, "core"),
        (PACKAGE_CHANGED, 2, "core_plus"),
    ]
    # The relay's clock has not settled the allocation: nothing of Bob's is published.
    await publish_outbox(settling, decided + timedelta(minutes=1))
    assert trail(await topic_events(settling), BOB_USER) == []

    # A new device of Bob's, decided on a clock inside the allocation's window.
    await agents.send(decided + timedelta(minutes=2), (BOB_PHONE, "install", decided))
    assert await outbox(settling, BOB_USER) == [
        ("license.allocated", 1, "core"),
        (PACKAGE_CHANGED, 2, "core_plus"),
    ]

    await publish_outbox(settling, decided + SETTLE)
    assert trail(await topic_events(settling), BOB_USER) == [
        ("license.allocated", None, "core", 1),
        (PACKAGE_CHANGED, "core", "core_plus", 2),
    ]
    assert await reconciled(settling) == []


async def test_an_erasure_on_an_earlier_clock_releases_after_the_package_change(
    services: Services, settling: Settings
) -> None:
    """The erasure withdraws pending allocations; one a package change already follows is no
    longer pending (withdrawing it would leave the change behind with no allocation before
    it): the license is released as the subject's next event, not before the change."""
    console, agents = Console(services, settling), Agents(services, settling)
    await console.send(
        day(0),
        subscription("s-core", "core", day(0)),
        subscription("s-plus", "core_plus", day(0), group_id="admins"),
    )
    decided = day(0) + timedelta(minutes=10)
    await agents.send(decided, (BOB, "install", day(0)))
    await console.send(decided + SETTLE, member("admins", BOB_USER, day(0)))
    repository = await Repository.connect(settling.database_url.get_secret_value(), 2)
    try:
        erasures = Erasures(
            settling,
            repository,
            FixedClock(decided + timedelta(seconds=30)),
            lambda: publish_outbox(settling, decided + SETTLE),
        )
        await erasures.erase(ErasureTarget.of(Scope.USER, BOB_USER, ACME), "ticket 7", 5)
    finally:
        await repository.close()

    events = await topic_events(settling)
    bob = sorted((e for e in events if e["subject_id"] == BOB_USER), key=lambda e: e["sequence"])
    assert [(e["type"], e["sequence"], e["effective_at"]) for e in bob] == [
        ("license.allocated", 1, day(0).isoformat()),
        (PACKAGE_CHANGED, 2, (decided + SETTLE).isoformat()),
        ("license.released", 3, (decided + SETTLE).isoformat()),
    ]
    assert bob[-1]["reason"] == "erasure_requested"

"""Customers, subscriptions, groups and trials from the console topic, against the real
broker and database: package attribution, trial conversion, inactivation, bad input."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, time, timedelta
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import REGISTRY

from schemas.admin_events import AdminEventModel
from tests.integration.license_support import (
    admin_event,
    apply_admin,
    billing_view,
    day,
    ingest,
    publish_outbox,
    rows_containing,
    send,
    send_admin,
    sweep,
)
from tests.integration.test_usage_report import report
from tests.support import Services, fetch, fetchval, make_settings, read_all
from worker.db.repository import Repository
from worker.ingest.coalesce import coalesce
from worker.ingest.decoding import (
    AgentEventModel,
    Rejection,
    decode_admin_event,
    decode_agent_event,
)
from worker.licensing.decisions import decide_groups, groups_of_devices
from worker.settings import Settings
from worker.sim.fleet import SimulatedDevice, agent_event
from worker.tenants import loop as loop_module
from worker.tenants.changes import apply_admin_event
from worker.tenants.loop import AdminLoop

pytestmark = pytest.mark.integration

ACME = "acme"
ANN = SimulatedDevice(ACME, "ann-laptop", "ann@acme.example", "business")
BOB = SimulatedDevice(ACME, "bob-laptop", "bob@acme.example", "business")
CARL = SimulatedDevice(ACME, "carl-laptop", "carl@acme.example", "business")
KIOSK = SimulatedDevice(ACME, "kiosk-1", None, "business")
ANN_USER, BOB_USER, CARL_USER = "ann@acme.example", "bob@acme.example", "carl@acme.example"


@pytest.fixture
def settings(services: Services, database_url: str, topics: dict[str, str]) -> Settings:
    return make_settings(
        services, database_url, topics, sweep_enabled=False, relay_poll_seconds=0.1
    )


class Console:
    """Sends console messages and lets the worker apply them on a set clock."""

    def __init__(self, services: Services, settings: Settings) -> None:
        self._services = services
        self._settings = settings
        self.sent = 0

    async def send(self, at: datetime, *events: dict[str, Any] | bytes) -> None:
        messages: list[Any] = list(events)
        self.sent += await send_admin(self._services, self._settings, messages)
        await apply_admin(self._services, self._settings, at, self.sent)


class Agents:
    def __init__(self, services: Services, settings: Settings) -> None:
        self._services = services
        self._settings = settings
        self.sent = 0

    async def send(self, at: datetime, *events: tuple[SimulatedDevice, str, datetime]) -> None:
        self.sent += await send(self._services, self._settings, list(events))
        await ingest(self._services, self._settings, at, self.sent)


def subscription(
    subscription_id: str, package: str, at: datetime, group_id: str | None = None, **fields: Any
) -> dict[str, Any]:
    return admin_event(
        "subscription.attached",
        ACME,
        at,
        subscription_id=subscription_id,
        package=package,
        group_id=group_id,
        **{"status": "active", **fields},
    )


def member(group_id: str, user_id: str, at: datetime, added: bool = True) -> dict[str, Any]:
    event_type = "group.member_added" if added else "group.member_removed"
    return admin_event(event_type, ACME, at, group_id=group_id, user_id=user_id)


async def packages(settings: Settings) -> dict[str, tuple[bool, str | None]]:
    rows = await fetch(
        settings.database_url.get_secret_value(),
        "SELECT subject_id, active, package FROM licenses WHERE customer_id = $1",
        ACME,
    )
    return {row["subject_id"]: (row["active"], row["package"]) for row in rows}


async def test_group_members_get_the_group_package_and_new_members_get_it_automatically(
    services: Services, settings: Settings
) -> None:
    console, agents = Console(services, settings), Agents(services, settings)
    await console.send(
        day(0),
        admin_event("customer.created", ACME, day(0), name="Acme Ltd"),
        subscription("s-core", "core", day(0)),
        subscription("s-plus", "core_plus", day(0), group_id="admins"),
        member("admins", ANN_USER, day(0)),
        member("admins", CARL_USER, day(0)),
    )
    await agents.send(
        day(0) + timedelta(minutes=10),
        *[(d, "install", day(0) + timedelta(minutes=1)) for d in (ANN, BOB, KIOSK)],
    )
    assert await packages(settings) == {
        "ann@acme.example": (True, "core_plus"),
        "bob@acme.example": (True, "core"),  # in no group: the customer's default
        "kiosk-1": (True, "core"),  # unassigned device: the default
    }

    # Bob joins the group: his license moves to the group's package without a new license.
    await console.send(day(1), member("admins", BOB_USER, day(1)))
    assert (await packages(settings))["bob@acme.example"] == (True, "core_plus")
    history = await fetch(
        settings.database_url.get_secret_value(),
        "SELECT change, package FROM license_history WHERE subject_id = $1 ORDER BY id",
        BOB.user_id,
    )
    assert [(r["change"], r["package"]) for r in history] == [
        ("allocated", "core"),
        ("package_changed", "core_plus"),
    ]

    # Carl was added before his first signal: his first license already has the package.
    await agents.send(day(2), (CARL, "install", day(2) - timedelta(minutes=5)))
    assert (await packages(settings))["carl@acme.example"] == (True, "core_plus")
    await publish_outbox(settings)
    events = await billing_view(services, settings, 7)
    allocations = {
        e["subject_id"]: e["package"] for e in events if e["type"] == "license.allocated"
    }
    assert allocations == {
        "ann@acme.example": "core_plus",
        "bob@acme.example": "core",
        "kiosk-1": "core",
        "carl@acme.example": "core_plus",
    }
    attached = [e for e in events if e["type"] == "subscription.attached"]
    assert {(e["subject_id"], e["package"], e["group_id"]) for e in attached} == {
        ("s-core", "core", None),
        ("s-plus", "core_plus", "admins"),
    }


async def test_group_package_precedence_and_leaving_a_group(
    services: Services, settings: Settings
) -> None:
    console, agents = Console(services, settings), Agents(services, settings)
    await console.send(
        day(0),
        subscription("s-default", "core_plus", day(0)),
        subscription("s-helpdesk", "core", day(0), group_id="helpdesk"),
        subscription("s-admins", "core_plus", day(0), group_id="admins"),
        member("helpdesk", ANN_USER, day(0)),
        member("helpdesk", BOB_USER, day(0)),
        member("admins", BOB_USER, day(0)),
    )
    await agents.send(day(0) + timedelta(minutes=5), *[(d, "install", day(0)) for d in (ANN, BOB)])
    assert await packages(settings) == {
        # A group's package applies even when the customer's default is higher.
        "ann@acme.example": (True, "core"),
        # In two groups: the highest package.
        "bob@acme.example": (True, "core_plus"),
    }
    # A late "added" older than the removal does not bring Bob back into the group.
    await console.send(
        day(1),
        member("admins", BOB_USER, day(1), added=False),
        member("admins", BOB_USER, day(0) + timedelta(hours=1)),
    )
    assert (await packages(settings))["bob@acme.example"] == (True, "core")


async def test_a_trial_turns_active_at_its_end_exactly_once(
    services: Services, settings: Settings
) -> None:
    ends = day(2)
    console = Console(services, settings)
    await console.send(
        day(0), subscription("s-trial", "core_plus", day(0), status="in_trial", trial_ends_at=ends)
    )
    before = await sweep(settings, ends - timedelta(seconds=1))
    assert before.trials_activated == 0
    at_end = await sweep(settings, ends)  # the boundary itself ends the trial
    assert at_end.trials_activated == 1
    again = await sweep(settings, ends + timedelta(days=1))
    assert again.trials_activated == 0
    url = settings.database_url.get_secret_value()
    status = await fetchval(
        url, "SELECT status FROM subscriptions WHERE subscription_id = 's-trial'"
    )
    assert status == "active"
    events = await billing_view(services, settings, 2)
    [activated] = [e for e in events if e["type"] == "subscription.activated"]
    assert (activated["reason"], datetime.fromisoformat(activated["effective_at"])) == (
        "trial_ended",
        ends,
    )
    assert (activated["package"], activated["previous_status"]) == ("core_plus", "in_trial")


async def test_a_console_change_before_the_trial_end_wins(
    services: Services, settings: Settings
) -> None:
    ends = day(5)
    console, agents = Console(services, settings), Agents(services, settings)
    await console.send(
        day(0),
        subscription("s-early", "core", day(0), status="in_trial", trial_ends_at=ends),
        subscription("s-late", "core_plus", day(0), status="in_trial", trial_ends_at=ends),
    )
    await agents.send(day(0) + timedelta(minutes=5), (ANN, "install", day(0)))
    # Activated by hand two days before the end: the trial end then has nothing to do.
    await console.send(
        day(3),
        admin_event(
            "subscription.status_changed", ACME, day(3), subscription_id="s-early", status="active"
        ),
    )
    # s-late: the sweeper converts it at its end; a cancellation the admin made an hour
    # before the end reaches us only afterwards, and still wins.
    report = await sweep(settings, ends + timedelta(minutes=1))
    assert report.trials_activated == 1
    await console.send(
        ends + timedelta(hours=1),
        admin_event(
            "subscription.status_changed",
            ACME,
            ends - timedelta(hours=1),
            subscription_id="s-late",
            status="cancelled",
        ),
    )
    url = settings.database_url.get_secret_value()
    rows = await fetch(url, "SELECT subscription_id, status FROM subscriptions ORDER BY 1")
    assert [(r["subscription_id"], r["status"]) for r in rows] == [
        ("s-early", "active"),
        ("s-late", "cancelled"),
    ]
    # With core+ cancelled, Ann's license falls back to core.
    assert (await packages(settings))["ann@acme.example"] == (True, "core")
    await publish_outbox(settings)
    events = await billing_view(services, settings, 7)
    status_events = [
        (e["type"], e["subject_id"], e["reason"])
        for e in events
        if e["type"] in ("subscription.activated", "subscription.cancelled")
    ]
    assert status_events == [
        ("subscription.activated", "s-early", "manual"),
        ("subscription.activated", "s-late", "trial_ended"),
        ("subscription.cancelled", "s-late", "manual"),
    ]


async def test_inactivation_releases_everything_and_stops_billing_until_reactivation(
    services: Services, settings: Settings
) -> None:
    console, agents = Console(services, settings), Agents(services, settings)
    await console.send(day(0), subscription("s-core", "core", day(0)))
    await agents.send(
        day(0) + timedelta(minutes=5), *[(d, "install", day(0)) for d in (ANN, BOB, KIOSK)]
    )
    inactivated_at = day(1)
    await console.send(day(1), admin_event("customer.inactivated", ACME, inactivated_at))
    assert set((await packages(settings)).values()) == {(False, "core")}
    url = settings.database_url.get_secret_value()
    reasons = await fetch(url, "SELECT DISTINCT release_reason, released_at FROM licenses")
    assert [(r["release_reason"], r["released_at"]) for r in reasons] == [
        ("customer_inactivated", inactivated_at)
    ]

    # Signals keep being stored for audit, and license nothing: not Ann again, not Carl.
    await agents.send(
        day(2), (ANN, "heartbeat", day(2) - timedelta(minutes=1)), (CARL, "install", day(2))
    )
    last_seen = await fetchval(
        url, "SELECT last_seen_at FROM devices WHERE device_id = $1", ANN.device_id
    )
    assert last_seen == day(2) - timedelta(minutes=1)
    assert "carl@acme.example" not in await packages(settings)
    assert not any(active for active, _ in (await packages(settings)).values())
    snapshot_day = await sweep(settings, day(2))
    assert snapshot_day.usage_snapshots == 0, "an inactive customer is not billed"

    reactivated_at = day(3)
    await console.send(day(3), admin_event("customer.reactivated", ACME, reactivated_at))
    licensed = await packages(settings)
    assert {k for k, (active, _) in licensed.items() if active} == {
        "ann@acme.example",
        "bob@acme.example",
        "carl@acme.example",
        "kiosk-1",
    }
    await publish_outbox(settings)
    events = await billing_view(services, settings, 13)
    kinds = [(e["type"], e["reason"]) for e in events if e["type"] != "subscription.attached"]
    assert kinds == [
        *[("license.allocated", "first_signal")] * 3,
        *[("license.released", "customer_inactivated")] * 3,
        ("customer.inactivated", "customer_inactivated"),
        *[("license.allocated", "reactivated")] * 3,
        ("license.allocated", "first_signal"),  # Carl, first licensed at the reactivation
        ("customer.reactivated", "customer_reactivated"),
    ]
    reallocations = [e for e in events if e["reason"] in ("reactivated",)]
    assert {datetime.fromisoformat(e["effective_at"]) for e in reallocations} == {reactivated_at}


async def test_bad_console_messages_go_to_the_dlq_and_changes_apply_once(
    services: Services, settings: Settings
) -> None:
    console = Console(services, settings)
    attach = subscription("s-core", "core", day(0))
    renamed = admin_event("customer.updated", ACME, day(0) + timedelta(hours=2), name="New")
    older_name = admin_event("customer.updated", ACME, day(0) + timedelta(hours=1), name="Old")
    await console.send(
        day(1),
        b"{not json",
        admin_event("customer.deleted", ACME, day(0)),  # unknown type
        admin_event("subscription.attached", ACME, day(0), subscription_id="s", package="gold"),
        admin_event(
            "subscription.status_changed", ACME, day(0), subscription_id="nope", status="active"
        ),
        attach,
        attach,  # redelivered: the same message twice
        renamed,
        older_name,  # late: older than the rename already applied
    )
    lags = [
        REGISTRY.get_sample_value(
            "license_worker_consumer_lag_messages",
            {
                "group": settings.admin_consumer_group,
                "topic": settings.admin_topic,
                "partition": str(partition),
            },
        )
        for partition in range(4)
    ]
    assert [lag for lag in lags if lag is not None] == [0.0] * 4, "published, and caught up"
    letters = await read_all(services.kafka_bootstrap_servers, settings.dlq_topic, 4)
    reasons = sorted(dict(r.headers)["dlq.error.class"].decode() for r in letters)
    assert reasons == ["invalid_json", "schema_violation", "unknown_subscription", "unknown_type"]
    assert {dict(r.headers)["dlq.source.topic"].decode() for r in letters} == {settings.admin_topic}
    url = settings.database_url.get_secret_value()
    assert await fetchval(url, "SELECT count(*) FROM subscriptions") == 1
    assert await fetchval(url, "SELECT name FROM customers WHERE customer_id = $1", ACME) == "New"
    assert (
        await fetchval(
            url,
            "SELECT count(*) FROM license_outbox WHERE payload->>'type' = 'subscription.attached'",
        )
        == 1
    )


async def test_one_usage_snapshot_per_customer_and_day(
    services: Services, settings: Settings
) -> None:
    console, agents = Console(services, settings), Agents(services, settings)
    await console.send(day(0), subscription("s-core", "core", day(0)))
    await agents.send(
        day(0) + timedelta(minutes=5), (ANN, "install", day(0)), (KIOSK, "install", day(0))
    )
    noon = datetime.combine(day(1).date(), time(12), UTC)
    first, second = await sweep(settings, noon), await sweep(settings, noon + timedelta(hours=1))
    next_day = await sweep(settings, noon + timedelta(days=1))
    assert (first.usage_snapshots, second.usage_snapshots, next_day.usage_snapshots) == (1, 0, 1)
    await publish_outbox(settings)
    events = await billing_view(services, settings, 5)
    snapshots = [e for e in events if e["type"] == "usage.snapshot"]
    assert [(s["day"], s["licensed_users"], s["by_package"]) for s in snapshots] == [
        (
            d.isoformat(),
            1,
            {"core": {"licensed_users": 1, "device_licenses": 1, "total_licenses": 2}},
        )
        for d in (noon.date(), noon.date() + timedelta(days=1))
    ]


async def test_users_of_a_device_model_customer_are_purged_too(
    services: Services, settings: Settings
) -> None:
    """Under the device model users hold no license of their own; their personal data goes
    once they have been silent for the window plus the retention (day 0 + 30 + 90)."""
    console, agents = Console(services, settings), Agents(services, settings)
    await console.send(
        day(0), admin_event("customer.created", ACME, day(0), license_model="device")
    )
    await agents.send(day(0) + timedelta(minutes=5), (ANN, "install", day(0)))
    assert await packages(settings) == {ANN.device_id: (True, None)}
    assert (await sweep(settings, day(31))).released == 1
    assert (await sweep(settings, day(119))).purged == 0
    assert (await sweep(settings, day(121))).purged == 1
    for needle in (ANN_USER, f"User {ANN_USER}", f"host-{ANN.device_id}"):
        assert await rows_containing(settings, needle) == [], needle
    again = await sweep(settings, day(200))
    assert again.purged == 0, "a pseudonym is never purged twice"


async def test_a_membership_change_and_a_first_signal_at_once_never_miss_each_other(
    settings: Settings,
) -> None:
    """Ingestion allocates Dan's first license while the console adds Dan to a group. Each
    transaction must see the other's writes, or Dan keeps the default package for good."""
    now = day(0)
    repository = await Repository.connect(settings.database_url.get_secret_value(), 3)
    event_key = settings.event_id_key()
    dan = SimulatedDevice(ACME, "dan-laptop", "dan@acme.example", "business")
    try:
        for event in (
            subscription("s-core", "core", now),
            subscription("s-plus", "core_plus", now, group_id="admins"),
        ):
            async with repository.transaction() as session:
                await apply_admin_event(
                    session, decode(event), now, settings.license_window, event_key=event_key
                )

        install = decode_agent(agent_event(dan, "install", now))
        changes = coalesce([install], now, settings.future_tolerance)
        async with repository.transaction() as ingestion:
            result = await ingestion.write_signals(changes, [], now - settings.license_window)
            groups = groups_of_devices(
                (d.customer_id, d.device_id, d.user_id, d.previous_user_id)
                for d in result.license_relevant
            )
            rows = await decide_groups(
                ingestion, groups, now, now, settings.license_window, event_key=event_key
            )
            assert [(r.change, r.package) for r in rows] == [("allocated", "core")]

            async def add_dan() -> None:
                async with repository.transaction() as console:
                    event = decode(member("admins", "dan@acme.example", now))
                    await apply_admin_event(
                        console, event, now, settings.license_window, event_key=event_key
                    )

            membership = asyncio.create_task(add_dan())
            await asyncio.sleep(0.5)
            assert not membership.done(), "the console change waits for the batch in progress"
        await asyncio.wait_for(membership, 10)
    finally:
        await repository.close()
    assert (await packages(settings))["dan@acme.example"] == (True, "core_plus")


def decode(event: dict[str, Any]) -> AdminEventModel:
    decoded = decode_admin_event(orjson.dumps(event), 65_536)
    assert not isinstance(decoded, Rejection), decoded
    return decoded


def decode_agent(event: dict[str, Any]) -> AgentEventModel:
    decoded = decode_agent_event(orjson.dumps(event), 65_536)
    assert not isinstance(decoded, Rejection), decoded
    return decoded


async def test_an_inactive_customers_trial_waits_for_its_reactivation(
    services: Services, settings: Settings
) -> None:
    ends, reactivated_at = day(2), day(4)
    console = Console(services, settings)
    await console.send(
        day(0),
        admin_event("customer.created", ACME, day(0), name="Acme Ltd"),
        subscription("s-trial", "core_plus", day(0), status="in_trial", trial_ends_at=ends),
    )
    await console.send(day(1), admin_event("customer.inactivated", ACME, day(1)))
    while_inactive = await sweep(settings, ends + timedelta(hours=1))
    assert while_inactive.trials_activated == 0
    url = settings.database_url.get_secret_value()
    status_sql = "SELECT status FROM subscriptions WHERE subscription_id = 's-trial'"
    assert await fetchval(url, status_sql) == "in_trial"

    await console.send(reactivated_at, admin_event("customer.reactivated", ACME, reactivated_at))
    after = await sweep(settings, reactivated_at + timedelta(minutes=5))
    assert after.trials_activated == 1
    assert await fetchval(url, status_sql) == "active"
    events = await billing_view(services, settings, 5)
    [activated] = [e for e in events if e["type"] == "subscription.activated"]
    assert activated["reason"] == "trial_ended"
    assert datetime.fromisoformat(activated["effective_at"]) == reactivated_at
    order = [e["type"] for e in events]
    assert order.index("customer.reactivated") < order.index("subscription.activated")


async def test_seats_over_and_back_are_told_to_billing_once_each(
    services: Services, settings: Settings
) -> None:
    console, agents = Console(services, settings), Agents(services, settings)
    await console.send(
        day(0),
        admin_event("customer.created", ACME, day(0), name="Acme Ltd"),
        subscription("s-core", "core", day(0), seats=2),
        subscription("s-admins", "core_plus", day(0), group_id="admins", seats=1),
        member("admins", ANN_USER, day(0)),
        member("admins", BOB_USER, day(0)),
    )
    # Ann and Bob use the group's core+ seats (2 of 1); Carl and the kiosk's device license
    # are core: Carl is the customer-wide subscription's only licensed user (1 of 2).
    await agents.send(
        day(0) + timedelta(minutes=5),
        *[(device, "install", day(0)) for device in (ANN, BOB, CARL, KIOSK)],
    )
    first = await sweep(settings, day(0) + timedelta(minutes=10))
    assert first.seat_crossings == 1
    shown = await report(settings, day(0) + timedelta(minutes=11))
    [customer] = shown["customers"]
    assert [
        (s["subscription_id"], s["used"], s["seats"], s["over"]) for s in customer["seats"]
    ] == [
        ("s-admins", 2, 1, True),
        ("s-core", 1, 2, False),
    ]
    again = await sweep(settings, day(0) + timedelta(minutes=20))
    assert again.seat_crossings == 0, "told once, not at every pass"

    await console.send(day(1), member("admins", BOB_USER, day(1), added=False))
    back = await sweep(settings, day(1) + timedelta(minutes=10))
    assert back.seat_crossings == 1
    events = await billing_view(services, settings, 4 + 4 + 2)
    seat_events = [
        (e["type"], e["subject_id"], e["seats"], e["seats_used"], e["package"])
        for e in events
        if e["type"].startswith("subscription.") and "seats_used" in e
    ]
    assert seat_events == [
        ("subscription.over_seats", "s-admins", 1, 2, "core_plus"),
        ("subscription.within_seats", "s-admins", 1, 1, "core_plus"),
    ]


async def test_an_inactive_customer_is_never_told_over_seats(
    services: Services, settings: Settings
) -> None:
    console, agents = Console(services, settings), Agents(services, settings)
    await console.send(
        day(0),
        admin_event("customer.created", ACME, day(0), name="Acme Ltd"),
        subscription("s-core", "core", day(0), seats=1),
    )
    await agents.send(
        day(0) + timedelta(minutes=5), *[(device, "install", day(0)) for device in (ANN, BOB)]
    )
    await console.send(
        day(0) + timedelta(minutes=6),
        admin_event("customer.inactivated", ACME, day(0) + timedelta(minutes=6)),
    )
    report = await sweep(settings, day(0) + timedelta(minutes=10))
    assert report.seat_crossings == 0


async def test_console_lag_is_reported_in_seconds_like_the_agent_topics(
    services: Services, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One console message a fetch, each produced an hour ago: while messages wait, the lag in
    seconds is the age of the newest applied one; caught up, it is 0 (#18 part 10)."""
    monkeypatch.setattr(loop_module, "ADMIN_BATCH_RECORDS", 1)
    seen: list[tuple[float | None, float | None]] = []
    publish = AdminLoop._publish_lag

    async def publish_and_record(self: AdminLoop) -> None:
        await publish(self)
        labels = {
            "group": settings.admin_consumer_group,
            "topic": settings.admin_topic,
            "partition": "0",
        }
        seen.append(
            (
                REGISTRY.get_sample_value("license_worker_consumer_lag_messages", labels),
                REGISTRY.get_sample_value("license_worker_consumer_lag_seconds", labels),
            )
        )

    monkeypatch.setattr(AdminLoop, "_publish_lag", publish_and_record)
    an_hour_ago = int((datetime.now(UTC) - timedelta(hours=1)).timestamp() * 1000)
    producer = AIOKafkaProducer(bootstrap_servers=services.kafka_bootstrap_servers, acks="all")
    await producer.start()
    try:
        for index in range(3):
            event = admin_event("customer.created", f"c-{index}", day(0), name=f"C {index}")
            await producer.send_and_wait(
                settings.admin_topic,
                value=orjson.dumps(event),
                key=event["customer_id"].encode(),
                partition=0,
                timestamp_ms=an_hour_ago,
            )
    finally:
        await producer.stop()
    await apply_admin(services, settings, day(0), 3)
    behind = [(messages, seconds) for messages, seconds in seen if messages]
    assert behind, f"never seen behind: {seen}"
    assert all(seconds is not None and 3500 < seconds < 3700 for _, seconds in behind), behind
    assert seen[-1] == (0.0, 0.0)

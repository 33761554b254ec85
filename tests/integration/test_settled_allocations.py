"""Billing never receives what arrival order or batch boundaries alone caused, and every
subject's license intervals on the topic are ordered and never overlap (issue #18, parts 1,
8 and 9). Real Kafka and Postgres; the worker's, sweeper's and relay's clocks are set."""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from tests.integration.license_support import (
    ALICE_DEVICES,
    day,
    ingest,
    publish_outbox,
    send,
    sweep,
)
from tests.service_fixtures import fresh_topic_names
from tests.support import (
    Services,
    create_topics,
    fetch,
    fetchval,
    make_settings,
)
from worker.clock import FixedClock
from worker.db.repository import Repository
from worker.kafka.clients import read_until_end
from worker.licensing.billing_fold import BillingFold, license_event
from worker.licensing.erasure_rules import ErasureTarget, Scope
from worker.licensing.erasures import Erasures
from worker.settings import Settings
from worker.sim.fleet import SimulatedDevice, build_fleet

SETTLE = timedelta(seconds=300)
Subject = tuple[str, str, str]
Interval = tuple[datetime, datetime | None]


@pytest.fixture
def settings(services: Services, database_url: str, topics: dict[str, str]) -> Settings:
    return make_settings(
        services,
        database_url,
        topics,
        sweep_enabled=False,
        relay_poll_seconds=0.1,
        allocation_settle_seconds=SETTLE.total_seconds(),
    )


async def license_events(settings: Settings) -> list[dict[str, Any]]:
    """The license events on the topic up to its end, each event id once (as billing)."""
    seen: dict[str, dict[str, Any]] = {}
    async for record in read_until_end(settings, settings.license_events_topic):
        event = orjson.loads(record.value)
        if event["type"] in ("license.allocated", "license.released"):
            seen.setdefault(event["event_id"], event)
    return list(seen.values())


def fold(events: Iterable[dict[str, Any]]) -> dict[Subject, list[Interval]]:
    """Billing's fold of the topic with the reference consumer (worker/licensing/billing_fold):
    per subject, the intervals by `effective_at`. Asserts what billing relies on: numbers
    from 1 without gaps, no interval that changes the past or overlaps the previous one."""
    billing = BillingFold()
    numbers: dict[Subject, list[int]] = defaultdict(list)
    for event in events:
        parsed = license_event(event)
        if parsed is not None:
            billing.add(*parsed)
            numbers[parsed[0]].append(event["sequence"])
    assert billing.anomalies() == []
    assert all(min(subject_numbers) == 1 for subject_numbers in numbers.values()), numbers
    return {
        subject: [(interval.start, interval.end) for interval in intervals]
        for subject, intervals in billing.intervals().items()
    }


def daily_counts(
    folded: dict[Subject, list[Interval]], days: Iterable[date]
) -> dict[tuple[str, date], int]:
    """Licenses held at the end of each day, per customer: what a daily bill counts."""
    counts: Counter[tuple[str, date]] = Counter()
    for (customer_id, _, _), intervals in folded.items():
        for day_ in days:
            end = datetime.combine(
                day_ + timedelta(days=1), datetime.min.time(), tzinfo=day(0).tzinfo
            )
            if any(start < end and (stop is None or stop >= end) for start, stop in intervals):
                counts[(customer_id, day_)] += 1
    return dict(counts)


# --- part 1: no flapping allocations ------------------------------------------------------------


async def test_heartbeats_before_installs_bill_no_over_allowance_flaps(
    services: Services, settings: Settings
) -> None:
    """The benchmark's live shape in small: users with one business and two personal devices
    (and some without a user) whose kind-less heartbeats are decided before their installs
    arrive. Billing gets one allocation per user and per unassigned device, and nothing for
    the devices the heartbeats alone pushed over the allowance."""
    fleet = build_fleet(2, 30, seed=3)
    installed_at = day(0)
    heartbeats = [(d, "heartbeat", installed_at + timedelta(minutes=1)) for d in fleet]
    total = await send(services, settings, heartbeats)
    decided_at = day(0) + timedelta(hours=1)
    await ingest(services, settings, decided_at, total)
    flapping = await fetchval(
        settings.database_url.get_secret_value(),
        "SELECT count(*) FROM licenses WHERE basis = 'over_allowance' AND active",
    )
    assert flapping > 0  # the heartbeats alone call for over-allowance licenses
    # Seconds later, the installs (with the kinds) arrive.
    total += await send(services, settings, [(d, "install", installed_at) for d in fleet])
    await ingest(services, settings, decided_at + timedelta(seconds=20), total)

    # Not settled yet: nothing is published, and the transient allocations are gone.
    assert await publish_outbox(settings, decided_at + timedelta(seconds=30)) == 0
    await sweep(settings, decided_at + SETTLE + timedelta(seconds=21))

    users = {d.user_id for d in fleet if d.user_id is not None}
    unassigned = [d for d in fleet if d.user_id is None]
    events = await license_events(settings)
    assert Counter((e["type"], e["subject_type"], e["basis"], e["reason"]) for e in events) == {
        ("license.allocated", "user", "user", "first_signal"): len(users),
        ("license.allocated", "device", "unassigned", "first_signal"): len(unassigned),
    }
    # Every license from its subject's first signal (the install), whatever came first.
    assert {datetime.fromisoformat(e["effective_at"]) for e in events} == {installed_at}
    assert {e["sequence"] for e in events} == {1}
    assert len(events) / len(fleet) <= 1.05
    url = settings.database_url.get_secret_value()
    # The withdrawn allocations left no trace billing could be told of later.
    assert (
        await fetch(
            url, "SELECT 1 FROM licenses WHERE subject_type = 'device' AND basis = 'over_allowance'"
        )
        == []
    )
    assert await fetch(url, "SELECT 1 FROM license_history WHERE basis = 'over_allowance'") == []
    assert (
        await fetchval(url, "SELECT count(*) FROM license_outbox WHERE published_at IS NULL") == 0
    )
    folded = fold(events)
    assert all(len(intervals) == 1 for intervals in folded.values())


async def test_a_license_ended_within_the_settle_window_is_billed_as_one_batch_would(
    services: Services, settings: Settings
) -> None:
    """Installed, then uninstalled hours later in event time, the two decided seconds apart
    (a replay after an outage): billing gets what one batch with both decides, nothing; and
    the number the withdrawn allocation took is free again."""
    kiosk = SimulatedDevice("acme", "kiosk-9", None, "business")
    total = await send(services, settings, [(kiosk, "install", day(0))])
    await ingest(services, settings, day(1), total)
    url = settings.database_url.get_secret_value()
    assert await fetchval(url, "SELECT count(*) FROM license_outbox") == 1
    total += await send(services, settings, [(kiosk, "uninstall", day(0.3))])
    await ingest(services, settings, day(1) + timedelta(seconds=10), total)
    assert await fetchval(url, "SELECT count(*) FROM license_outbox") == 0
    assert await fetch(url, "SELECT 1 FROM licenses UNION ALL SELECT 1 FROM license_history") == []
    # Reinstalled later: a first allocation again, number 1, published once settled.
    total += await send(services, settings, [(kiosk, "install", day(0.5))])
    await ingest(services, settings, day(1) + timedelta(seconds=20), total)
    await sweep(settings, day(1) + SETTLE + timedelta(seconds=20))
    events = await license_events(settings)
    assert [(e["type"], e["reason"], e["sequence"]) for e in events] == [
        ("license.allocated", "first_signal", 1)
    ]
    assert fold(events) == {("acme", "device", "kiosk-9"): [(day(0.5), None)]}


# --- part 8: intervals never overlap -----------------------------------------------------------


async def test_moves_and_late_events_keep_every_subjects_intervals_in_order(
    services: Services, settings: Settings
) -> None:
    """Devices move between users and events arrive late. A device released covered_by_user
    and licensed again is never licensed again before its release; a moved device's old user
    is released where the new one is licensed."""
    laptop, phone, tablet, watch = ALICE_DEVICES
    tablet_of_bob = SimulatedDevice("acme", tablet.device_id, "bob@acme.example", "personal")
    total = await send(services, settings, [(d, "install", day(0)) for d in ALICE_DEVICES])
    total += await send(services, settings, [(watch, "heartbeat", day(2))])
    await ingest(services, settings, day(2), total)  # the watch is over the allowance
    # Day 15: the tablet moves to Bob. Alice's watch is covered again; Bob is licensed.
    total += await send(services, settings, [(tablet_of_bob, "heartbeat", day(15))])
    await ingest(services, settings, day(15), total)
    # Day 16: it comes back (Bob has no device; the watch is over the allowance again). A late
    # heartbeat of the watch from day 3 and of the laptop from day 10 arrive with it.
    total += await send(
        services,
        settings,
        [
            (tablet, "heartbeat", day(16)),
            (watch, "heartbeat", day(3)),
            (laptop, "heartbeat", day(10)),
        ],
    )
    await ingest(services, settings, day(16), total)
    # Day 17: the phone moves to Bob, and a late heartbeat naming Alice from day 14 arrives.
    phone_of_bob = SimulatedDevice("acme", phone.device_id, "bob@acme.example", "personal")
    total += await send(services, settings, [(phone_of_bob, "heartbeat", day(17))])
    total += await send(services, settings, [(phone, "heartbeat", day(14))])
    await ingest(services, settings, day(17), total)
    await sweep(settings, day(17) + SETTLE)

    events = await license_events(settings)
    folded = fold(events)  # asserts order and no overlap for every subject
    watch_subject = ("acme", "device", watch.device_id)
    assert len(folded[watch_subject]) == 2
    assert folded[watch_subject][1][0] >= folded[watch_subject][0][1]  # type: ignore[operator]
    # Bob's first license starts where the move was reported, and his release where the
    # tablet came back: not before his first signal, not at a later decision time.
    bob = folded[("acme", "user", "bob@acme.example")]
    assert bob[0] == (day(15), day(16))


# --- part 9: the same input bills the same way, whatever the batching ---------------------------


@dataclass(frozen=True)
class Billed:
    intervals: dict[Subject, list[Interval]]
    daily: dict[tuple[str, date], int]
    events: int


async def bill_the_stream(
    services: Services, template_database: str, batch_max_records: int
) -> Billed:
    """One run on fresh topics and a fresh database: the stream produced once, ingested with
    `batch_max_records`, swept and published after the settle window, read back and folded."""
    url = await services.create_database("license_test", template=template_database)
    await services.set_up_roles(url)
    names = fresh_topic_names()
    await create_topics(services.kafka_bootstrap_servers, names, partitions=4)
    settings = make_settings(
        services,
        services.worker_url(url),
        names,
        sweep_enabled=False,
        relay_poll_seconds=0.1,
        batch_max_records=batch_max_records,
        allocation_settle_seconds=SETTLE.total_seconds(),
    )
    try:
        fleet = build_fleet(2, 24, seed=5)
        start = day(0)
        stream: list[tuple[SimulatedDevice, str, datetime]] = []
        # Heartbeats first on the wire (they carry no kind), then the installs, then every
        # tenth device's uninstall.
        for round_number in range(3):
            at = start + timedelta(minutes=1 + 5 * round_number)
            stream += [(d, "heartbeat", at) for d in fleet]
        stream += [(d, "install", start) for d in fleet]
        stream += [(d, "uninstall", start + timedelta(hours=2)) for d in fleet[::10]]
        total = await send(services, settings, stream)
        decided_at = start + timedelta(hours=3)
        await ingest(services, settings, decided_at, total)
        await sweep(settings, decided_at + SETTLE)
        events = await license_events(settings)
        folded = fold(events)
        days = [start.date() + timedelta(days=n) for n in range(2)]
        return Billed(folded, daily_counts(folded, days), len(events))
    finally:
        await services.drop_database(url)


async def test_the_same_stream_bills_the_same_whatever_the_batch_size(
    services: Services, template_database: str
) -> None:
    runs = {
        size: await bill_the_stream(services, template_database, size) for size in (1, 50, 5000)
    }
    reference = runs[5000]
    assert reference.intervals
    for size, billed in runs.items():
        assert billed.intervals == reference.intervals, f"BATCH_MAX_RECORDS={size}"
        assert billed.daily == reference.daily, f"BATCH_MAX_RECORDS={size}"
        assert billed.events == reference.events, f"BATCH_MAX_RECORDS={size}"


# --- withdrawals: what the worker may delete, and erasures ---------------------------------------


async def test_an_erasure_withdraws_a_pending_allocation_instead_of_releasing_it(
    services: Services, settings: Settings
) -> None:
    """Alice is licensed and erased within the settle window: billing hears of neither her
    allocation nor a release, only of the erasure, and the erasure does not wait for the
    window to end."""
    installed = [(d, "install", day(0)) for d in ALICE_DEVICES]
    decided_at = day(0) + timedelta(minutes=10)
    await ingest(services, settings, decided_at, await send(services, settings, installed))
    url = settings.database_url.get_secret_value()
    assert await fetchval(url, "SELECT count(*) FROM license_outbox") == 2  # Alice, the watch
    repository = await Repository.connect(url, 2)
    try:
        erasures = Erasures(
            settings,
            repository,
            FixedClock(decided_at + timedelta(seconds=30)),
            lambda: publish_outbox(settings, decided_at + timedelta(seconds=30)),
        )
        target = ErasureTarget.of(Scope.USER, ALICE_DEVICES[0].user_id or "", "acme")
        receipt = await erasures.erase(target, "ticket GDPR-7", wait_seconds=5)
    finally:
        await repository.close()
    assert receipt.removed.get("licenses", 0) == 0  # withdrawn: nothing left to erase
    await publish_outbox(settings, decided_at + SETTLE * 2)
    events = []
    async for record in read_until_end(settings, settings.license_events_topic):
        events.append(orjson.loads(record.value))
    assert [e["type"] for e in events] == ["user.erased"]
    assert await fetch(url, "SELECT 1 FROM licenses") == []
    # The history keeps the erasure's own record, and nothing of the withdrawn allocations.
    history = await fetch(url, "SELECT change FROM license_history")
    assert [row["change"] for row in history] == ["purged"]


async def test_the_worker_can_withdraw_only_what_billing_has_not_received(
    services: Services, settings: Settings
) -> None:
    """The worker role has no DELETE on the outbox, the history or the licenses; the function
    it withdraws through refuses a published allocation, another event type, and an
    allocation published at once (no settle window)."""
    kiosk = SimulatedDevice("acme", "kiosk-3", None, "business")
    decided_at = day(1)
    await ingest(
        services, settings, decided_at, await send(services, settings, [(kiosk, "install", day(0))])
    )
    url = settings.database_url.get_secret_value()
    [pending] = await fetch(url, "SELECT event_id FROM license_outbox")
    # Published: out of reach.
    assert await publish_outbox(settings, decided_at + SETTLE) == 1
    withdrawn = await fetch(
        url, "SELECT * FROM withdraw_unsettled_allocations($1::uuid[])", [pending["event_id"]]
    )
    assert withdrawn == []
    # Unpublished, but not an allocation in its settle window: out of reach too.
    superuser = services.superuser_url(url)
    for event_type, settles_at in (("license.released", day(9)), ("license.allocated", None)):
        event_id = uuid.uuid4()
        await fetch(
            superuser,
            "INSERT INTO license_outbox (event_id, customer_id, subject_type, subject_id, "
            "payload, settles_at) VALUES ($1, 'acme', 'device', 'kiosk-3', $2::jsonb, $3)",
            event_id,
            orjson.dumps({"type": event_type}).decode(),
            settles_at,
        )
        withdrawn = await fetch(
            url, "SELECT * FROM withdraw_unsettled_allocations($1::uuid[])", [event_id]
        )
        assert withdrawn == [], event_type
    assert await fetchval(url, "SELECT count(*) FROM license_history") == 1
    assert await fetchval(url, "SELECT count(*) FROM license_outbox") == 3
    assert await fetchval(url, "SELECT count(*) FROM licenses") == 1
    # The reporter may not call it at all.
    reporter = services.reporter_url(url)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await fetch(reporter, "SELECT * FROM withdraw_unsettled_allocations('{}'::uuid[])")

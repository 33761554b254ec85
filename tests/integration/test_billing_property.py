"""Property (issue #18, part 5): whatever a small fleet and its console do, the license events
folded by the reference billing consumer (`worker/licensing/billing_fold.py`) equal the
usage report at every sweep, live and `--as-of` that time, per customer and package.

Hypothesis draws the fleets and console changes: installs, heartbeats, uninstalls, devices
moving between users, subscriptions attached and cancelled, group memberships, customers
inactivated and reactivated, over rounds hours to weeks apart. Each example runs them through
the real worker (real Kafka and Postgres, the worker's and sweeper's clocks set to the round),
on a database and topics of its own, with the production settle window (each sweep's events
are published once the allocations decided so far have settled); at the end,
`reconcile --from --to` over the example's days finds no difference (usage snapshots
included)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, Phase, example, given, note, settings
from hypothesis import strategies as st

from tests.integration.license_support import admin_event, day, publish_outbox, send, sweep
from tests.service_fixtures import fresh_topic_names
from tests.support import (
    Services,
    committed_offsets_total,
    create_topics,
    encode,
    make_settings,
    produce,
    running_worker,
    wait_until,
)
from worker.clock import FixedClock
from worker.db.repository import Repository
from worker.kafka.clients import read_until_end
from worker.licensing.billing_fold import BillingFold, CustomerPackage, license_event
from worker.licensing.reconcile_days import DailyReconciliation, days_between, reconcile_days
from worker.report.build import totals_as_of
from worker.settings import Settings
from worker.sim.fleet import SimulatedDevice

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

CUSTOMERS = ("acme", "globex")
DEVICES = ("d0", "d1", "d2", "d3")
USERS = ("u0@x.example", "u1@x.example", None)
GROUPS = ("admins", "staff")
GAPS = (timedelta(hours=1), timedelta(days=2), timedelta(days=31))
SETTLE = timedelta(seconds=300)


@dataclass(frozen=True)
class Signal:
    customer_id: str
    device_id: str
    user_id: str | None
    kind: str
    event_type: str  # install, heartbeat, uninstall
    minutes_before: int


@dataclass(frozen=True)
class ConsoleChange:
    customer_id: str
    change: str  # attach, cancel, member_added, member_removed, inactivate, reactivate
    target: str | None  # a group (attach: None for the whole customer; member: the group)
    package: str
    user_id: str | None


@dataclass(frozen=True)
class Round:
    gap: timedelta
    signals: list[Signal]
    console: list[ConsoleChange]


signals = st.builds(
    Signal,
    customer_id=st.sampled_from(CUSTOMERS),
    device_id=st.sampled_from(DEVICES),
    user_id=st.sampled_from(USERS),
    kind=st.sampled_from(("business", "personal")),
    event_type=st.sampled_from(("install", "install", "heartbeat", "heartbeat", "uninstall")),
    minutes_before=st.integers(0, 180),
)
console_changes = st.builds(
    ConsoleChange,
    customer_id=st.sampled_from(CUSTOMERS),
    change=st.sampled_from(
        (
            "attach",
            "attach",
            "cancel",
            "member_added",
            "member_added",
            "member_removed",
            "inactivate",
            "reactivate",
        )
    ),
    target=st.sampled_from((None, *GROUPS)),
    package=st.sampled_from(("core", "core_plus")),
    user_id=st.sampled_from(USERS[:2]),
)
rounds = st.lists(
    st.builds(
        Round,
        gap=st.sampled_from(GAPS),
        signals=st.lists(signals, min_size=1, max_size=8),
        console=st.lists(console_changes, max_size=3),
    ),
    min_size=1,
    max_size=3,
)


# A held license whose package changes (a customer-wide subscription attached while a user is
# licensed): billing hears of it only through `license.package_changed` (issue #18, part 2).
PACKAGE_CHANGE = [
    Round(
        timedelta(hours=1),
        [Signal("acme", "d0", USERS[0], "business", "install", 10)],
        [],
    ),
    Round(timedelta(hours=1), [], [ConsoleChange("acme", "attach", None, "core_plus", None)]),
]
# A user released through silence, purged 90 days later (renamed to a pseudonym in the
# service, never on the topic) and back again: a new life under the old id, numbered from 1.
_OTHER = Signal("globex", "d1", None, "business", "heartbeat", 0)
PURGED_AND_BACK = [
    Round(timedelta(hours=1), [Signal("acme", "d0", USERS[0], "business", "install", 10)], []),
    Round(timedelta(days=125), [_OTHER], []),  # released (effective day 30)
    Round(timedelta(days=1), [_OTHER], []),  # purged, the release being published
    Round(timedelta(days=1), [Signal("acme", "d0", USERS[0], "business", "install", 5)], []),
]


@settings(
    max_examples=8,
    deadline=None,
    database=None,
    # Each example runs the real worker for seconds: no shrinking (the drawn timeline is
    # printed with the failure instead).
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(timeline=rounds)
@example(timeline=PACKAGE_CHANGE)
@example(timeline=PURGED_AND_BACK)
@pytest.mark.parametrize(
    "by_package",
    [
        pytest.param(False, id="per-customer"),
        pytest.param(True, id="per-package"),
    ],
)
async def test_billing_folded_from_the_topic_equals_the_report_at_every_sweep(
    services: Services, template_database: str, by_package: bool, timeline: list[Round]
) -> None:
    note(f"timeline: {timeline}")
    url = await services.create_database("license_test", template=template_database)
    await services.set_up_roles(url)
    try:
        settings_ = await _fresh_settings(services, services.worker_url(url))
        await _play(services, settings_, timeline, by_package)
    finally:
        await services.drop_database(url)


async def _fresh_settings(services: Services, database_url: str) -> Settings:
    names = fresh_topic_names()
    await create_topics(services.kafka_bootstrap_servers, names, partitions=2)
    # The test publishes at each sweep, once the allocations decided so far have settled
    # (the production window: allocations withdrawn within it are never billed).
    return make_settings(
        services,
        database_url,
        names,
        sweep_enabled=False,
        relay_enabled=False,
        allocation_settle_seconds=SETTLE.total_seconds(),
    )


async def _play(
    services: Services, settings_: Settings, timeline: list[Round], by_package: bool
) -> None:
    at = day(0)
    sent = {"agents": 0, "console": 0}
    first_sweep = None
    for round_ in timeline:
        at += round_.gap
        sent["console"] += await _send_console(services, settings_, round_.console, at)
        sent["agents"] += await send(
            services,
            settings_,
            [
                (
                    SimulatedDevice(s.customer_id, s.device_id, s.user_id, s.kind),
                    s.event_type,
                    at - timedelta(minutes=s.minutes_before),
                )
                for s in round_.signals
            ],
        )
        await _run_worker(services, settings_, at, sent)
        swept_at = at + timedelta(minutes=1)
        await sweep(settings_, swept_at)
        await publish_outbox(settings_, swept_at + SETTLE)
        first_sweep = first_sweep or swept_at
        await _check_fold_equals_report(settings_, swept_at, by_package)
    assert first_sweep is not None
    await _check_reconcile(settings_, day(0), at + timedelta(minutes=1), by_package)


async def _send_console(
    services: Services,
    settings_: Settings,
    changes: list[ConsoleChange],
    at: datetime,
) -> int:
    events: list[dict[str, Any]] = []
    for index, change in enumerate(changes):
        occurred = at - timedelta(minutes=30) + timedelta(seconds=index)
        subscription = f"sub-{change.target or 'all'}"
        if change.change == "attach":
            fields: dict[str, Any] = {
                "subscription_id": subscription,
                "package": change.package,
                "group_id": change.target,
                "status": "active",
            }
            events.append(
                admin_event("subscription.attached", change.customer_id, occurred, **fields)
            )
        elif change.change == "cancel":
            events.append(
                admin_event(
                    "subscription.status_changed",
                    change.customer_id,
                    occurred,
                    subscription_id=subscription,
                    status="cancelled",
                )
            )
        elif change.change in ("member_added", "member_removed"):
            events.append(
                admin_event(
                    f"group.{change.change}",
                    change.customer_id,
                    occurred,
                    group_id=change.target or GROUPS[0],
                    user_id=change.user_id,
                )
            )
        else:
            events.append(admin_event(f"customer.{change.change}d", change.customer_id, occurred))
    if not events:
        return 0
    return await produce(
        services.kafka_bootstrap_servers,
        settings_.admin_topic,
        [(e["customer_id"].encode(), encode(e)) for e in events],
    )


async def _run_worker(
    services: Services, settings_: Settings, at: datetime, sent: dict[str, int]
) -> None:
    """The worker, its clock at `at`, until both of its consumer groups committed everything."""
    bootstrap = services.kafka_bootstrap_servers
    async with running_worker(settings_, clock=FixedClock(at)):

        async def committed() -> bool:
            agents = await committed_offsets_total(
                bootstrap, settings_.consumer_group, settings_.agent_topics
            )
            console = await committed_offsets_total(
                bootstrap, settings_.admin_consumer_group, [settings_.admin_topic]
            )
            return agents >= sent["agents"] and console >= sent["console"]

        await wait_until(committed, timeout=60)


async def _check_fold_equals_report(settings_: Settings, at: datetime, by_package: bool) -> None:
    """The fold's counts at the sweep, on both clocks (nothing takes effect after its
    decision here), equal the report as of the sweep and the live report."""
    fold = BillingFold()
    async for record in read_until_end(settings_, settings_.license_events_topic):
        parsed = license_event(orjson.loads(record.value))
        if parsed is not None:
            fold.add(*parsed)
    assert fold.anomalies() == []
    repository = await Repository.connect(settings_.database_url.get_secret_value(), 1)
    try:
        async with repository.snapshot() as session:
            as_of = _by_package(await totals_as_of(session, None, at))
            live = _by_package(await totals_as_of(session, None, None))
    finally:
        await repository.close()
    expected = _granular(as_of, by_package)
    assert _granular(fold.known_at([at])[at], by_package) == expected, f"as of {at}"
    assert _granular(fold.held_at([at])[at], by_package) == expected, f"billed at {at}"
    assert live == as_of


async def _check_reconcile(
    settings_: Settings, first: datetime, last: datetime, by_package: bool
) -> None:
    """`reconcile --from --to` over the example's days: snapshots and as-of reports."""
    repository = await Repository.connect(settings_.database_url.get_secret_value(), 2)
    try:
        result = await reconcile_days(
            settings_, repository, days_between(first.astimezone(UTC).date(), last.date())
        )
    finally:
        await repository.close()
    assert result.pending == 0
    assert result.anomalies == []
    assert result.unreadable == 0
    if by_package:
        assert result.differences == []
    else:
        assert _customer_totals_that_differ(result) == []


def _granular(counts: Counter[CustomerPackage], by_package: bool) -> Counter[tuple[str, str]]:
    if by_package:
        return counts
    totals: Counter[tuple[str, str]] = Counter()
    for (customer_id, _), licenses in counts.items():
        totals[(customer_id, "all")] += licenses
    return totals


def _customer_totals_that_differ(result: DailyReconciliation) -> list[tuple[str, datetime]]:
    """Instants at which a customer's licenses, all packages together, differ."""
    sums: dict[tuple[str, datetime], list[int]] = {}
    for d in result.differences:
        totals = sums.setdefault((d.customer_id, d.at), [0, 0, 0])
        totals[0] += d.topic
        totals[1] += d.topic if d.snapshot is None else d.snapshot
        totals[2] += d.report
    return sorted(key for key, (t, s, r) in sums.items() if not t == s == r)


def _by_package(totals: dict[str, Any]) -> Counter[CustomerPackage]:
    return Counter(
        {
            (customer_id, name): package.total_licenses
            for customer_id, usage in totals.items()
            for name, package in usage.by_package.items()
            if package.total_licenses
        }
    )

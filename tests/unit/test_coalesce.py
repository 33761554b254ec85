"""`worker.ingest.coalesce`: a batch of events folded into one change per device, user and event."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import AGENT_EVENT_ADAPTER
from worker.ingest.coalesce import (
    AgentEventModel,
    BatchChanges,
    DeviceChange,
    LifecycleRecord,
    UserChange,
    clamp_event_time,
    coalesce,
)
from worker.sim.fleet import agent_event, build_fleet, heartbeat_rounds

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
RECEIVED = T0 + timedelta(hours=6)
TOLERANCE = timedelta(minutes=5)
LIMIT = RECEIVED + TOLERANCE
ABSENT: Any = object()  # the event has no user_id field at all

_event_numbers = itertools.count()


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def event(
    event_type: str = "heartbeat",
    *,
    minutes: float = 0,
    when: datetime | None = None,
    customer: str = "cust-1",
    device: str = "dev-1",
    user_id: Any = ABSENT,
    profile: dict[str, Any] | None = None,
    event_id: str | None = None,
    **fields: Any,
) -> AgentEventModel:
    document: dict[str, Any] = {
        "schema_version": 1,
        "event_id": event_id or f"evt-{next(_event_numbers)}",
        "type": event_type,
        "customer_id": customer,
        "device_id": device,
        "occurred_at": (when or at(minutes)).isoformat(),
    }
    if user_id is not ABSENT:
        document["user_id"] = user_id
    if profile is not None:
        document["user"] = profile
    if event_type == "install":
        document |= {"device_kind": "business", "hostname": "host-1", "os": "linux"}
    document |= fields
    return AGENT_EVENT_ADAPTER.validate_python(document)


def fold(*events: AgentEventModel) -> BatchChanges:
    return coalesce(events, RECEIVED, TOLERANCE)


def only_device(changes: BatchChanges) -> DeviceChange:
    assert len(changes.devices) == 1
    return next(iter(changes.devices.values()))


# --- seen times -----------------------------------------------------------------------------


def test_empty_batch() -> None:
    changes = fold()
    assert changes == BatchChanges()
    assert changes.customer_ids == []
    assert changes.sorted_devices() == []


def test_first_and_last_seen_are_min_and_max() -> None:
    device = only_device(fold(event(minutes=10), event(minutes=30), event(minutes=20)))
    assert device.first_seen_at == at(10)
    assert device.last_seen_at == at(30)
    assert device.last_present_at == at(30)
    assert device.last_installed_at is None
    assert device.last_uninstalled_at is None


def test_single_heartbeat_device_change() -> None:
    device = only_device(fold(event(minutes=5, agent_version="5.3.1")))
    assert device == DeviceChange(
        customer_id="cust-1",
        device_id="dev-1",
        first_seen_at=at(5),
        last_seen_at=at(5),
        last_present_at=at(5),
        agent_version="5.3.1",
        agent_version_reported_at=at(5),
        unattributed_seen_at=at(5),
    )


def test_install_then_uninstall() -> None:
    changes = fold(event("install", minutes=0, user_id="alice"), event("uninstall", minutes=10))
    device = only_device(changes)
    assert device.first_seen_at == at(0)
    assert device.last_seen_at == at(10)
    assert device.last_installed_at == at(0)
    assert device.last_present_at == at(0)
    assert device.last_uninstalled_at == at(10)
    # The uninstall named nobody: it is credited to whoever owns the device.
    assert device.unattributed_seen_at == at(10)
    assert device.user_id == "alice"


def test_uninstall_keeps_the_latest_time() -> None:
    device = only_device(fold(event("uninstall", minutes=30), event("uninstall", minutes=10)))
    assert device.last_uninstalled_at == at(30)
    assert device.unattributed_seen_at == at(30)
    assert device.last_present_at is None


def test_uninstall_naming_a_user_does_not_assign_nor_touch_the_user() -> None:
    changes = fold(event("uninstall", minutes=10, user_id="bob"))
    device = only_device(changes)
    assert device.user_id is None
    assert device.user_reported_at is None
    assert device.unattributed_seen_at == at(10)
    assert changes.users == {}


def test_uninstall_ignores_its_agent_version() -> None:
    device = only_device(fold(event("uninstall", minutes=10, agent_version="9.9")))
    assert device.agent_version is None


# --- user assignment ------------------------------------------------------------------------


def test_heartbeat_naming_a_user_assigns_the_device() -> None:
    changes = fold(event(minutes=10, user_id="alice"))
    device = only_device(changes)
    assert (device.user_id, device.user_reported_at) == ("alice", at(10))
    assert device.unattributed_seen_at is None
    assert changes.users == {
        ("cust-1", "alice"): UserChange(
            "cust-1", "alice", first_seen_at=at(10), last_seen_at=at(10)
        )
    }


@pytest.mark.parametrize(
    ("events", "user_id", "reported_minutes"),
    [
        pytest.param([("alice", 20), ("bob", 10)], "alice", 20, id="newer-first"),
        pytest.param([("bob", 10), ("alice", 20)], "alice", 20, id="newer-last"),
        pytest.param([("alice", 10), ("bob", 10)], "bob", 10, id="tie-later-message-wins"),
        pytest.param([("bob", 10), ("alice", 10)], "alice", 10, id="tie-later-message-wins-2"),
        pytest.param([("alice", 10), (None, 20)], None, 20, id="newer-null-unassigns"),
        pytest.param([(None, 20), ("alice", 10)], None, 20, id="older-name-loses-to-null"),
        pytest.param([(None, 5), ("alice", 10)], "alice", 10, id="newer-name-beats-null"),
        pytest.param([("alice", 10), (None, 10)], None, 10, id="tie-null-later-wins"),
        pytest.param([("alice", 10), (ABSENT, 20)], "alice", 10, id="absent-keeps-user"),
        pytest.param([(ABSENT, 20), ("alice", 10)], "alice", 10, id="older-name-after-absent"),
        pytest.param([(ABSENT, 10)], None, None, id="absent-only"),
        pytest.param([(None, 10)], None, 10, id="null-only"),
    ],
)
def test_device_user_latest_naming_event_wins(
    events: list[tuple[Any, int]], user_id: str | None, reported_minutes: int | None
) -> None:
    device = only_device(fold(*(event(minutes=m, user_id=user) for user, m in events)))
    assert device.user_id == user_id
    expected_reported = None if reported_minutes is None else at(reported_minutes)
    assert device.user_reported_at == expected_reported


@pytest.mark.parametrize(
    ("events", "unattributed_minutes"),
    [
        pytest.param([("alice", 10)], None, id="named"),
        pytest.param([(None, 10)], None, id="explicit-null-is-attributed"),
        pytest.param([(ABSENT, 10)], 10, id="absent"),
        pytest.param([(ABSENT, 10), (ABSENT, 30), ("alice", 40)], 30, id="latest-absent"),
    ],
)
def test_unattributed_seen_at(
    events: list[tuple[Any, int]], unattributed_minutes: int | None
) -> None:
    device = only_device(fold(*(event(minutes=m, user_id=user) for user, m in events)))
    expected = None if unattributed_minutes is None else at(unattributed_minutes)
    assert device.unattributed_seen_at == expected


def test_heartbeat_without_user_touches_no_user() -> None:
    assert fold(event(minutes=1), event(minutes=2, user_id=None)).users == {}


def test_user_seen_times_span_all_their_devices() -> None:
    changes = fold(
        event(minutes=30, device="laptop", user_id="alice"),
        event(minutes=10, device="phone", user_id="alice"),
        event("install", minutes=20, device="tablet", user_id="alice"),
    )
    user = changes.users[("cust-1", "alice")]
    assert (user.first_seen_at, user.last_seen_at) == (at(10), at(30))
    assert len(changes.devices) == 3


# --- device details -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("events", "kind", "kind_minutes"),
    [
        pytest.param([("install", "personal", 0)], "personal", 0, id="install"),
        pytest.param([("heartbeat", None, 10)], None, None, id="never-reported"),
        pytest.param(
            [("install", "business", 5), ("heartbeat", "personal", 10)],
            "personal",
            10,
            id="newer-heartbeat",
        ),
        pytest.param(
            [("heartbeat", "personal", 10), ("install", "business", 5)],
            "personal",
            10,
            id="older-install-after",
        ),
        pytest.param(
            [("install", "business", 0), ("heartbeat", None, 10)],
            "business",
            0,
            id="heartbeat-without-kind",
        ),
        pytest.param(
            [("heartbeat", "personal", 10), ("heartbeat", "business", 10)],
            "business",
            10,
            id="tie-later-message",
        ),
    ],
)
def test_device_kind_latest_report_wins(
    events: list[tuple[str, str | None, int]], kind: str | None, kind_minutes: int | None
) -> None:
    folded = []
    for event_type, device_kind, minutes in events:
        extra = {"device_kind": device_kind} if device_kind else {}
        folded.append(event(event_type, minutes=minutes, **extra))
    device = only_device(fold(*folded))
    assert device.device_kind == kind
    assert device.kind_reported_at == (None if kind_minutes is None else at(kind_minutes))


def test_device_kind_is_stored_as_its_text() -> None:
    device = only_device(fold(event("install", device_kind="personal")))
    assert type(device.device_kind) is str


def test_install_sets_hostname_and_os_latest_wins() -> None:
    changes = fold(
        event("install", minutes=20, hostname="new-host", os="windows-11"),
        event("install", minutes=10, hostname="old-host", os="windows-10"),
        event(minutes=30),
    )
    device = only_device(changes)
    assert (device.hostname, device.os, device.details_reported_at) == (
        "new-host",
        "windows-11",
        at(20),
    )
    assert device.last_installed_at == at(20)
    assert device.last_present_at == at(30)


def test_agent_version_latest_wins() -> None:
    device = only_device(
        fold(
            event(minutes=20, agent_version="5.4.0"),
            event(minutes=10, agent_version="5.3.0"),
            event(minutes=30),
        )
    )
    assert (device.agent_version, device.agent_version_reported_at) == ("5.4.0", at(20))


def test_install_sets_the_users_profile() -> None:
    changes = fold(
        event(
            "install",
            minutes=10,
            user_id="alice",
            profile={"email": "alice@contoso.example", "display_name": "Alice"},
        )
    )
    user = changes.users[("cust-1", "alice")]
    assert (user.email, user.display_name, user.profile_reported_at) == (
        "alice@contoso.example",
        "Alice",
        at(10),
    )


def test_newest_install_profile_wins_and_profileless_events_keep_it() -> None:
    def install(minutes: int, email: str | None) -> AgentEventModel:
        profile = {"email": email, "display_name": None} if email else None
        return event("install", minutes=minutes, user_id="alice", profile=profile)

    changes = fold(
        install(30, "new@contoso.example"),
        install(10, "old@contoso.example"),
        install(40, None),
        event(minutes=50, user_id="alice"),
    )
    user = changes.users[("cust-1", "alice")]
    assert (user.email, user.profile_reported_at) == ("new@contoso.example", at(30))
    assert user.last_seen_at == at(50)


def test_profile_of_an_install_without_user_id_is_not_attributed() -> None:
    changes = fold(event("install", profile={"email": "who@contoso.example"}))
    assert changes.users == {}


def test_heartbeat_leaves_the_profile_empty() -> None:
    user = fold(event(user_id="alice")).users[("cust-1", "alice")]
    assert (user.email, user.display_name, user.profile_reported_at) == (None, None, None)


# --- clamping future clocks -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("occurred_at", "expected"),
    [
        (RECEIVED - timedelta(days=30), RECEIVED - timedelta(days=30)),
        (RECEIVED, RECEIVED),
        (LIMIT, LIMIT),
        (LIMIT + timedelta(microseconds=1), LIMIT),
        (RECEIVED + timedelta(days=3650), LIMIT),
    ],
    ids=["past", "received", "at-limit", "just-past-limit", "ten-years-ahead"],
)
def test_clamp_event_time(occurred_at: datetime, expected: datetime) -> None:
    assert clamp_event_time(occurred_at, RECEIVED + TOLERANCE) == expected


def test_future_events_are_clamped_and_counted() -> None:
    far = RECEIVED + timedelta(days=2)
    changes = fold(
        event(when=far, user_id="alice"),
        event("install", when=far, user_id="alice"),
        event(when=LIMIT),
        event(when=RECEIVED - timedelta(hours=1)),
    )
    assert changes.clamped_events == 2
    device = only_device(changes)
    assert device.last_seen_at == LIMIT
    assert device.user_reported_at == LIMIT
    assert device.last_installed_at == LIMIT
    assert changes.users[("cust-1", "alice")].last_seen_at == LIMIT
    (record,) = changes.lifecycle.values()
    assert record.occurred_at == LIMIT


def test_zero_tolerance_clamps_to_the_receive_time() -> None:
    changes = coalesce([event(when=RECEIVED + timedelta(seconds=1))], RECEIVED, timedelta(0))
    assert changes.clamped_events == 1
    assert only_device(changes).last_seen_at == RECEIVED


def test_clamp_compares_instants_not_offsets() -> None:
    instant = LIMIT - timedelta(minutes=1)
    # The same instant written with a +02:00 offset reads later on the wall clock only.
    changes = fold(event(when=instant.astimezone(timezone(timedelta(hours=2)))))
    assert changes.clamped_events == 0
    assert only_device(changes).last_seen_at == instant


# --- keys -----------------------------------------------------------------------------------


def test_same_device_id_under_two_customers_is_two_devices() -> None:
    changes = fold(
        event(minutes=1, customer="cust-b", device="dev-1", user_id="alice"),
        event(minutes=2, customer="cust-a", device="dev-1", user_id="alice"),
    )
    assert set(changes.devices) == {("cust-a", "dev-1"), ("cust-b", "dev-1")}
    assert set(changes.users) == {("cust-a", "alice"), ("cust-b", "alice")}
    assert changes.customer_ids == ["cust-a", "cust-b"]
    assert changes.devices[("cust-a", "dev-1")].last_seen_at == at(2)
    assert changes.devices[("cust-b", "dev-1")].last_seen_at == at(1)


def test_sorted_accessors_order_by_key() -> None:
    changes = fold(
        event("install", customer="c2", device="d1", user_id="u2", event_id="e2"),
        event("install", customer="c1", device="d2", user_id="u1", event_id="e3"),
        event("uninstall", customer="c1", device="d1", event_id="e1"),
    )
    assert [(d.customer_id, d.device_id) for d in changes.sorted_devices()] == [
        ("c1", "d1"),
        ("c1", "d2"),
        ("c2", "d1"),
    ]
    assert [(u.customer_id, u.user_id) for u in changes.sorted_users()] == [
        ("c1", "u1"),
        ("c2", "u2"),
    ]
    assert [(r.customer_id, r.event_id) for r in changes.sorted_lifecycle()] == [
        ("c1", "e1"),
        ("c1", "e3"),
        ("c2", "e2"),
    ]


# --- lifecycle records ----------------------------------------------------------------------


def test_heartbeats_make_no_lifecycle_records() -> None:
    assert fold(event(user_id="alice"), event(), event(user_id=None)).lifecycle == {}


def test_lifecycle_records() -> None:
    changes = fold(
        event("install", minutes=1, event_id="e-install"),
        event("uninstall", minutes=2, event_id="e-uninstall"),
    )
    assert changes.sorted_lifecycle() == [
        LifecycleRecord("cust-1", "e-install", "dev-1", "install", at(1)),
        LifecycleRecord("cust-1", "e-uninstall", "dev-1", "uninstall", at(2)),
    ]


def test_redelivered_lifecycle_event_collapses() -> None:
    install = event("install", minutes=1, event_id="e-1")
    changes = fold(install, install, event("install", minutes=1, event_id="e-1"))
    assert list(changes.lifecycle) == [("cust-1", "e-1")]


def test_same_event_id_under_two_customers_is_two_records() -> None:
    changes = fold(
        event("uninstall", customer="cust-a", event_id="e-1"),
        event("uninstall", customer="cust-b", event_id="e-1"),
    )
    assert set(changes.lifecycle) == {("cust-a", "e-1"), ("cust-b", "e-1")}


def test_events_may_be_a_one_shot_iterator() -> None:
    events = (event(minutes=minutes) for minutes in range(5))
    device = only_device(coalesce(events, RECEIVED, TOLERANCE))
    assert (device.first_seen_at, device.last_seen_at) == (at(0), at(4))


def test_simulated_fleet() -> None:
    fleet = build_fleet(customers=2, devices_per_customer=20)
    installs = [agent_event(device, "install", T0) for device in fleet]
    rounds = heartbeat_rounds(fleet, rounds=3, start=T0, interval=timedelta(minutes=5))
    heartbeats = [agent_event(device, "heartbeat", when) for device, when in rounds]
    events = [AGENT_EVENT_ADAPTER.validate_python(doc) for doc in installs + heartbeats]
    changes = fold(*events)
    assert len(changes.devices) == 40
    assert len(changes.lifecycle) == 40
    assert changes.clamped_events == 0
    assigned = [device for device in fleet if device.user_id is not None]
    assert len(changes.users) == len({(d.customer_id, d.user_id) for d in assigned})
    for simulated in fleet:
        device = changes.devices[(simulated.customer_id, simulated.device_id)]
        assert device.user_id == simulated.user_id
        assert device.device_kind == simulated.kind
        assert (device.first_seen_at, device.last_seen_at) == (T0, T0 + timedelta(minutes=10))
    for user in changes.users.values():
        assert user.email == user.user_id
        assert user.last_seen_at == T0 + timedelta(minutes=10)


# --- properties -----------------------------------------------------------------------------

CUSTOMERS = ["c1", "c2"]
DEVICES = ["d1", "d2", "d3"]
USERS = [ABSENT, None, "u1", "u2"]


@st.composite
def agent_events(draw: st.DrawFn, *, allow_future: bool = True) -> AgentEventModel:
    event_type = draw(st.sampled_from(["heartbeat", "heartbeat", "install", "uninstall"]))
    latest = 8 * 60 if allow_future else 6 * 60
    fields: dict[str, Any] = {}
    if event_type == "install":
        fields["device_kind"] = draw(st.sampled_from(["business", "personal"]))
        fields["hostname"] = draw(st.sampled_from(["h1", "h2"]))
        if draw(st.booleans()):
            fields["profile"] = {"email": draw(st.sampled_from(["a@x.example", "b@x.example"]))}
    elif event_type == "heartbeat" and draw(st.booleans()):
        fields["device_kind"] = draw(st.sampled_from(["business", "personal"]))
    return event(
        event_type,
        minutes=draw(st.integers(min_value=-24 * 60, max_value=latest)),
        customer=draw(st.sampled_from(CUSTOMERS)),
        device=draw(st.sampled_from(DEVICES)),
        user_id=draw(st.sampled_from(USERS)),
        agent_version=draw(st.sampled_from(["1", "2"])),
        **fields,
    )


def device_maxima(change: DeviceChange) -> tuple[datetime | None, ...]:
    return (
        change.first_seen_at,
        change.last_seen_at,
        change.last_present_at,
        change.last_installed_at,
        change.last_uninstalled_at,
        change.unattributed_seen_at,
        change.user_reported_at,
        change.kind_reported_at,
        change.details_reported_at,
        change.agent_version_reported_at,
    )


def summary(changes: BatchChanges) -> dict[str, Any]:
    return {
        "devices": {key: device_maxima(change) for key, change in changes.devices.items()},
        "users": {
            key: (user.first_seen_at, user.last_seen_at, user.profile_reported_at)
            for key, user in changes.users.items()
        },
        "lifecycle": set(changes.lifecycle),
        "clamped": changes.clamped_events,
    }


@settings(max_examples=150, deadline=None)
@given(events=st.lists(agent_events(), max_size=25), seed=st.integers())
def test_seen_times_do_not_depend_on_event_order(events: list[AgentEventModel], seed: int) -> None:
    shuffled = list(events)
    random.Random(seed).shuffle(shuffled)
    assert summary(fold(*shuffled)) == summary(fold(*events))


@settings(max_examples=100, deadline=None)
@given(
    minutes=st.lists(
        st.integers(min_value=-24 * 60, max_value=6 * 60), min_size=1, max_size=20, unique=True
    ),
    data=st.data(),
)
def test_with_distinct_event_times_the_whole_result_is_order_independent(
    minutes: list[int], data: st.DataObject
) -> None:
    # Distinct times (none clamped) leave no ties, so every "latest wins" field is determined.
    events = [
        data.draw(agent_events(allow_future=False)).model_copy(update={"occurred_at": at(m)})
        for m in minutes
    ]
    shuffled = data.draw(st.permutations(events))
    assert fold(*shuffled) == fold(*events)


def later(*moments: datetime | None) -> datetime | None:
    return max((moment for moment in moments if moment is not None), default=None)


def merge_maxima(first: BatchChanges, second: BatchChanges) -> dict[str, Any]:
    """What the database's upsert does with two batches: least first-seen, greatest of the rest."""
    devices = {}
    for key in first.devices.keys() | second.devices.keys():
        parts = [device_maxima(c.devices[key]) for c in (first, second) if key in c.devices]
        first_seen = min(part[0] for part in parts if part[0] is not None)
        latest = [later(*column) for column in zip(*parts, strict=True)]
        devices[key] = (first_seen, *latest[1:])
    users = {}
    for key in first.users.keys() | second.users.keys():
        changes = [c.users[key] for c in (first, second) if key in c.users]
        users[key] = (
            min(user.first_seen_at for user in changes),
            max(user.last_seen_at for user in changes),
            later(*(user.profile_reported_at for user in changes)),
        )
    return {
        "devices": devices,
        "users": users,
        "lifecycle": set(first.lifecycle) | set(second.lifecycle),
        "clamped": first.clamped_events + second.clamped_events,
    }


@settings(max_examples=150, deadline=None)
@given(events=st.lists(agent_events(), max_size=25), data=st.data())
def test_two_batches_merged_by_max_equal_one_batch(
    events: list[AgentEventModel], data: st.DataObject
) -> None:
    split = data.draw(st.integers(min_value=0, max_value=len(events)))
    merged = merge_maxima(fold(*events[:split]), fold(*events[split:]))
    assert merged == summary(fold(*events))


@settings(max_examples=150, deadline=None)
@given(events=st.lists(agent_events(), max_size=25))
def test_invariants_of_every_device(events: list[AgentEventModel]) -> None:
    changes = fold(*events)
    assert changes.clamped_events == sum(e.occurred_at > LIMIT for e in events)
    assert set(changes.devices) == {(e.customer_id, e.device_id) for e in events}
    lifecycle_events = [e for e in events if e.type != "heartbeat"]
    assert set(changes.lifecycle) == {(e.customer_id, e.event_id) for e in lifecycle_events}
    for device in changes.devices.values():
        assert device.first_seen_at <= device.last_seen_at <= LIMIT
        for moment in device_maxima(device)[2:]:
            assert moment is None or device.first_seen_at <= moment <= device.last_seen_at
    for user in changes.users.values():
        assert user.first_seen_at <= user.last_seen_at <= LIMIT


# --- splitting a batch for concurrent writes ------------------------------------------------


def test_split_into_one_part_is_the_batch_itself() -> None:
    changes = fold(event(customer="a"), event(customer="b"))
    assert changes.split_by_customer(1) == [changes]


def test_split_of_an_empty_batch_is_empty() -> None:
    assert fold().split_by_customer(2) == []


def test_split_of_one_customer_is_one_part() -> None:
    changes = fold(event(device="d1"), event(device="d2"))
    assert changes.split_by_customer(4) == [changes]


def test_split_keeps_each_customer_whole_and_balances_devices() -> None:
    sizes = {"big": 6, "mid": 4, "small-1": 2, "small-2": 1}
    events = [
        event("install", customer=customer, device=f"dev-{number}", user_id=f"u-{number % 2}")
        for customer, count in sizes.items()
        for number in range(count)
    ]
    changes = fold(*events)
    parts = changes.split_by_customer(2)
    assert len(parts) == 2
    customers_of = [set(part.customer_ids) for part in parts]
    assert customers_of[0].isdisjoint(customers_of[1])
    assert sorted(len(part.devices) for part in parts) == [6, 7]
    for part in parts:
        for mapping in (part.devices, part.users, part.lifecycle):
            assert {key[0] for key in mapping} <= set(part.customer_ids)
    for name in ("devices", "users", "lifecycle"):
        merged: dict[Any, Any] = {}
        for part in parts:
            merged |= getattr(part, name)
        assert merged == getattr(changes, name)


def test_split_never_makes_more_parts_than_customers() -> None:
    changes = fold(event(customer="a"), event(customer="b"))
    parts = changes.split_by_customer(8)
    assert sorted(part.customer_ids for part in parts) == [["a"], ["b"]]


@given(events=st.lists(agent_events(), max_size=25), parts=st.integers(1, 4))
def test_split_parts_partition_the_batch_by_customer(
    events: list[AgentEventModel], parts: int
) -> None:
    changes = coalesce(events, RECEIVED, TOLERANCE)
    split = changes.split_by_customer(parts)
    assert len(split) <= parts
    seen: set[str] = set()
    for part in split:
        assert seen.isdisjoint(part.customer_ids)
        seen |= set(part.customer_ids)
    assert seen == set(changes.customer_ids)
    assert sum(len(part.devices) for part in split) == len(changes.devices)
    assert sum(len(part.users) for part in split) == len(changes.users)
    assert sum(len(part.lifecycle) for part in split) == len(changes.lifecycle)


@given(first=st.lists(agent_events(), max_size=15), second=st.lists(agent_events(), max_size=15))
def test_folding_into_earlier_changes_equals_folding_both_batches_at_once(
    first: list[AgentEventModel], second: list[AgentEventModel]
) -> None:
    together = coalesce(first + second, RECEIVED, TOLERANCE)
    into = coalesce(second, RECEIVED, TOLERANCE, into=coalesce(first, RECEIVED, TOLERANCE))
    assert into == together


def test_split_makes_no_part_smaller_than_asked() -> None:
    changes = fold(*(event(customer=f"c{n % 4}", device=f"d{n}") for n in range(10)))
    assert len(changes.split_by_customer(4, min_devices_per_part=5)) == 2
    assert changes.split_by_customer(4, min_devices_per_part=6) == [changes]
    assert len(changes.split_by_customer(4)) == 4


def test_without_customers_drops_every_change_of_those_customers_only() -> None:
    """UNKNOWN_CUSTOMERS=refuse: the changes of unknown customers leave the batch whole."""
    events = [
        event("install", customer="known", device="d1", user_id="u", profile={"email": "e"}),
        event("install", customer="ghost", device="d1", user_id="u", profile={"email": "e"}),
        event("uninstall", customer="ghost", device="d2", minutes=1),
        event("heartbeat", customer="ghost:d1", device="d1", user_id="u"),
    ]
    changes = coalesce(events, RECEIVED, TOLERANCE)
    kept = changes.without_customers({"ghost"})
    assert set(kept.devices) == {("known", "d1"), ("ghost:d1", "d1")}
    assert set(kept.users) == {("known", "u"), ("ghost:d1", "u")}
    assert {key[0] for key in kept.lifecycle} == {"known"}
    assert kept.devices[("known", "d1")] is changes.devices[("known", "d1")]
    assert kept.customer_ids == ["ghost:d1", "known"]
    assert len(changes.devices) == 4, "the original is left as it was"

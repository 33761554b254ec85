"""`worker.licensing.decisions`: the groups a device change affects, and license changes as rows and
outbound events."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.license_events import LICENSE_EVENT_ADAPTER
from worker.licensing.decisions import Group, groups_of_devices, license_event_json, license_row
from worker.licensing.rules import (
    Basis,
    ChangeKind,
    LicenseChange,
    Reason,
    SubjectType,
    license_event_id,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
EFFECTIVE = NOW - timedelta(days=3)
EMITTED = NOW + timedelta(seconds=5)
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def user_group(user_id: str, customer_id: str = "cust-1") -> Group:
    return Group(customer_id, SubjectType.USER, user_id)


def device_group(device_id: str, customer_id: str = "cust-1") -> Group:
    return Group(customer_id, SubjectType.DEVICE, device_id)


# --- groups_of_devices -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("devices", "expected"),
    [
        pytest.param([], set(), id="nothing"),
        pytest.param(
            [("cust-1", "dev-1", "alice", None)], {user_group("alice")}, id="device-with-user"
        ),
        pytest.param(
            [("cust-1", "dev-1", None, None)], {device_group("dev-1")}, id="device-without-user"
        ),
        pytest.param(
            [("cust-1", "dev-1", "alice", "alice")], {user_group("alice")}, id="same-user-again"
        ),
        pytest.param(
            [("cust-1", "dev-1", "bob", "alice")],
            {user_group("bob"), user_group("alice")},
            id="moved-device-both-users",
        ),
        pytest.param(
            [("cust-1", "dev-1", None, "alice")],
            {device_group("dev-1"), user_group("alice")},
            id="unassigned-from-user-device-and-old-user",
        ),
        pytest.param(
            [("cust-1", "dev-1", "alice", None), ("cust-1", "dev-2", "alice", None)],
            {user_group("alice")},
            id="two-devices-one-user-one-group",
        ),
        pytest.param(
            [("cust-1", "dev-1", "alice", None), ("cust-2", "dev-1", "alice", None)],
            {user_group("alice"), user_group("alice", "cust-2")},
            id="same-ids-other-customer-other-group",
        ),
        pytest.param(
            [("cust-1", "alice", None, None), ("cust-1", "dev-1", "alice", None)],
            {device_group("alice"), user_group("alice")},
            id="device-and-user-sharing-an-id-stay-apart",
        ),
    ],
)
def test_groups_of_devices(
    devices: list[tuple[str, str, str | None, str | None]], expected: set[Group]
) -> None:
    assert groups_of_devices(devices) == expected


# --- license_row -------------------------------------------------------------------------------


def make_change(
    kind: ChangeKind = ChangeKind.ALLOCATED,
    subject_type: SubjectType = SubjectType.USER,
    subject_id: str = "alice",
    basis: Basis = Basis.USER,
    reason: Reason | None = Reason.FIRST_SIGNAL,
    effective_at: datetime = EFFECTIVE,
    sequence: int = 1,
) -> LicenseChange:
    return LicenseChange(
        kind, subject_type, subject_id, basis, reason, effective_at, sequence=sequence
    )


@pytest.mark.parametrize(
    ("change", "event_type"),
    [
        pytest.param(make_change(), "license.allocated", id="allocated-user"),
        pytest.param(
            make_change(
                subject_type=SubjectType.DEVICE,
                subject_id="dev-7f3a",
                basis=Basis.OVER_ALLOWANCE,
                reason=Reason.REACTIVATED,
            ),
            "license.allocated",
            id="allocated-device-reactivated",
        ),
        pytest.param(
            make_change(ChangeKind.RELEASED, reason=Reason.INACTIVE),
            "license.released",
            id="released-user-inactive",
        ),
        pytest.param(
            make_change(
                ChangeKind.RELEASED,
                subject_type=SubjectType.DEVICE,
                subject_id="dev-1",
                basis=Basis.UNASSIGNED,
                reason=Reason.UNINSTALLED,
            ),
            "license.released",
            id="released-device-uninstalled",
        ),
    ],
)
def test_license_row_with_event(change: LicenseChange, event_type: str) -> None:
    row = license_row(KEY, "cust-042", change, EMITTED)
    assert (row.customer_id, row.subject_type, row.subject_id) == (
        "cust-042",
        change.subject_type.value,
        change.subject_id,
    )
    assert (row.change, row.basis, row.reason, row.effective_at) == (
        change.kind.value,
        change.basis.value,
        change.reason.value if change.reason else None,
        change.effective_at,
    )
    assert row.event_id == license_event_id(
        KEY,
        "cust-042",
        event_type,
        change.subject_type,
        change.subject_id,
        change.effective_at,
        sequence=change.sequence,
    )
    assert row.payload is not None
    event = LICENSE_EVENT_ADAPTER.validate_json(row.payload)
    assert event.schema_version == 1
    assert event.event_id == row.event_id
    assert event.type == event_type
    assert event.customer_id == "cust-042"
    assert event.subject_type == change.subject_type.value
    assert event.subject_id == change.subject_id
    assert event.reason == row.reason
    assert event.basis == change.basis.value
    assert event.effective_at == change.effective_at
    assert event.emitted_at == EMITTED
    assert event.sequence == change.sequence == row.event_sequence


def test_basis_changed_has_no_event() -> None:
    change = make_change(
        ChangeKind.BASIS_CHANGED,
        subject_type=SubjectType.DEVICE,
        subject_id="dev-1",
        basis=Basis.OVER_ALLOWANCE,
        reason=None,
        effective_at=NOW,
    )
    row = license_row(KEY, "cust-1", change, EMITTED)
    assert row.event_id is None
    assert row.payload is None
    assert (row.change, row.basis, row.reason, row.effective_at) == (
        "basis_changed",
        "over_allowance",
        None,
        NOW,
    )


def event_id_of(customer_id: str, change: LicenseChange, emitted_at: datetime = EMITTED) -> str:
    event_id = license_row(KEY, customer_id, change, emitted_at).event_id
    assert event_id is not None
    return event_id


def test_two_decisions_of_one_subject_with_one_effective_time_are_two_events() -> None:
    """Allocated, released, allocated again while the newest signal did not move: the fault
    run's lost re-allocation. The event number tells the two allocations apart."""
    first = event_id_of("cust-1", make_change(sequence=1))
    release = event_id_of("cust-1", make_change(ChangeKind.RELEASED, sequence=2))
    again = event_id_of("cust-1", make_change(reason=Reason.REACTIVATED, sequence=3))
    assert len({first, release, again}) == 3
    # Made again from the same stored state (a lost transaction, a redelivered batch).
    assert event_id_of("cust-1", make_change(reason=Reason.REACTIVATED, sequence=3)) == again


def test_event_id_is_deterministic() -> None:
    first = event_id_of("cust-1", make_change())
    assert event_id_of("cust-1", make_change()) == first
    # A re-published decision keeps its id, whenever it is emitted.
    assert event_id_of("cust-1", make_change(), EMITTED + timedelta(hours=1)) == first


@pytest.mark.parametrize(
    ("customer_id", "change"),
    [
        pytest.param(
            "cust-1", make_change(effective_at=EFFECTIVE + timedelta(seconds=1)), id="effective-at"
        ),
        pytest.param(
            "cust-1", make_change(effective_at=EFFECTIVE + timedelta(microseconds=1)), id="micro"
        ),
        pytest.param("cust-2", make_change(), id="customer"),
        pytest.param("cust-1", make_change(ChangeKind.RELEASED), id="released-vs-allocated"),
        pytest.param("cust-1", make_change(subject_id="bob"), id="subject-id"),
        pytest.param(
            "cust-1", make_change(subject_type=SubjectType.DEVICE), id="device-vs-user-same-id"
        ),
    ],
)
def test_event_id_differs_for_another_decision(customer_id: str, change: LicenseChange) -> None:
    assert event_id_of(customer_id, change) != event_id_of("cust-1", make_change())


def test_event_id_ignores_reason_and_basis() -> None:
    """The id names the decision (who, what, when), not its explanation."""
    other = make_change(basis=Basis.OVER_ALLOWANCE, reason=Reason.REACTIVATED)
    assert event_id_of("cust-1", other) == event_id_of("cust-1", make_change())


def test_license_event_json_without_subject() -> None:
    payload = license_event_json(
        event_id="e-1",
        event_type="customer.inactivated",
        customer_id="cust-1",
        subject_type=None,
        subject_id=None,
        reason="customer_inactivated",
        basis=None,
        effective_at=NOW,
        emitted_at=EMITTED,
    )
    document = orjson.loads(payload)
    assert document["effective_at"] == "2026-12-01T12:00:00+00:00"
    event = LICENSE_EVENT_ADAPTER.validate_json(payload)
    assert (event.type, event.subject_type, event.subject_id, event.basis) == (
        "customer.inactivated",
        None,
        None,
        None,
    )


ids = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FF), min_size=1)
instants = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


@settings(max_examples=100, deadline=None)
@given(
    customer_id=ids,
    kind=st.sampled_from([ChangeKind.ALLOCATED, ChangeKind.RELEASED]),
    subject_type=st.sampled_from(list(SubjectType)),
    subject_id=ids,
    basis=st.sampled_from(list(Basis)),
    reason=st.sampled_from(list(Reason)),
    effective_at=instants,
    emitted_at=instants,
)
def test_every_event_payload_validates(
    customer_id: str,
    kind: ChangeKind,
    subject_type: SubjectType,
    subject_id: str,
    basis: Basis,
    reason: Reason,
    effective_at: datetime,
    emitted_at: datetime,
) -> None:
    change = LicenseChange(kind, subject_type, subject_id, basis, reason, effective_at)
    row = license_row(KEY, customer_id, change, emitted_at)
    assert row.payload is not None
    event = LICENSE_EVENT_ADAPTER.validate_json(row.payload)
    assert (event.customer_id, event.subject_id, event.reason) == (
        customer_id,
        subject_id,
        reason.value,
    )
    assert (event.effective_at, event.emitted_at) == (effective_at, emitted_at)
    assert license_row(KEY, customer_id, change, emitted_at).event_id == row.event_id


SEPARATOR_COLLISIONS = [
    (("acme", "x|license.allocated|user|bob"), ("acme|license.allocated|user|x", "bob")),
    (("a\\", "b"), ("a", "\\b")),
    (("a\\|b", "c"), ("a", "\\|b|c")),
    (("a|", "b"), ("a", "|b")),
]


@pytest.mark.parametrize(("first", "second"), SEPARATOR_COLLISIONS)
def test_event_ids_of_ids_that_spell_each_other_differ(
    first: tuple[str, str], second: tuple[str, str]
) -> None:
    def event_id(customer_id: str, subject_id: str) -> str:
        return license_event_id(KEY, customer_id, "license.allocated", "user", subject_id, EMITTED)

    assert event_id(*first) != event_id(*second)


def test_event_ids_are_keyed_uuid_v8_that_the_published_scheme_cannot_reproduce() -> None:
    # Before: UUIDv5 of the escaped parts under a namespace written in the source, so anyone
    # could test a guessed user id against a stored event id.
    published_namespace = uuid.UUID("6f1f6d2e-4c1a-5b8e-9a43-0d2b7c51e0a1")
    name = f"cust-042|license.allocated|user|alice@contoso.example|{EMITTED.isoformat()}"
    actual = license_event_id(
        KEY, "cust-042", "license.allocated", "user", "alice@contoso.example", EMITTED
    )
    assert actual != str(uuid.uuid5(published_namespace, name))
    parsed = uuid.UUID(actual)
    assert (parsed.version, parsed.variant) == (8, uuid.RFC_4122)
    assert actual == license_event_id(
        KEY, "cust-042", "license.allocated", "user", "alice@contoso.example", EMITTED
    ), "deterministic under one key"
    assert actual != license_event_id(
        OTHER_KEY, "cust-042", "license.allocated", "user", "alice@contoso.example", EMITTED
    )


separator_heavy = st.text(alphabet="ab|\\", max_size=6)


@settings(max_examples=300, deadline=None)
@given(
    first=st.tuples(separator_heavy, separator_heavy),
    second=st.tuples(separator_heavy, separator_heavy),
)
def test_event_ids_differ_whenever_customer_or_subject_differ(
    first: tuple[str, str], second: tuple[str, str]
) -> None:
    def event_id(customer_id: str, subject_id: str) -> str:
        return license_event_id(KEY, customer_id, "license.allocated", "user", subject_id, EMITTED)

    assert (event_id(*first) == event_id(*second)) is (first == second)

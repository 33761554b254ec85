"""A package change of a held license reaches billing as `license.package_changed` (issue #18,
part 2): the rules, the event's payload and number, the settle window, and reconciliation."""

from __future__ import annotations

from datetime import timedelta

import orjson

from schemas.license_events import LICENSE_EVENT_ADAPTER
from tests.unit.test_license_rules import NOW, WINDOW, ago, dev, device, user
from tests.unit.test_reconcile import event, problems, stored
from worker.licensing.decisions import held_license, license_row
from worker.licensing.reconcile import compare, events_by_subject, topic_event
from worker.licensing.rules import (
    Basis,
    ChangeKind,
    CustomerTerms,
    HeldLicense,
    LicenseChange,
    PendingAllocation,
    Reason,
    license_changes,
    license_event_id,
    settled_license_changes,
)

KEY = bytes(range(32))
EMITTED = NOW + timedelta(seconds=5)
CORE_PLUS_FOR_ALICE = CustomerTerms(
    default_package="core",
    user_packages={"alice": "core_plus"},
    user_first_seen={"alice": ago(100)},
)
ALLOCATED, RELEASED, PACKAGE_CHANGED = (
    "license.allocated",
    "license.released",
    "license.package_changed",
)


def held_alice(package: str | None = "core", sequence: int = 1, at: object = None) -> HeldLicense:
    return HeldLicense(True, Basis.USER, package, sequence, at or ago(10))  # type: ignore[arg-type]


# --- the rules ------------------------------------------------------------------------------


def test_a_held_license_that_changes_package_is_its_subjects_next_event() -> None:
    [change] = license_changes(
        [device("b1")], {user("alice"): held_alice()}, CORE_PLUS_FOR_ALICE, NOW, WINDOW
    )
    assert change == LicenseChange(
        ChangeKind.PACKAGE_CHANGED,
        *user("alice"),
        Basis.USER,
        Reason.SUBSCRIPTION_CHANGED,
        NOW,
        "core_plus",
        2,
        previous_package="core",
    )


def test_a_package_change_takes_effect_no_earlier_than_the_subjects_previous_event() -> None:
    # An allocation at a reactivation the console dated after the decision's clock.
    later = NOW + timedelta(minutes=3)
    [change] = license_changes(
        [device("b1")], {user("alice"): held_alice(at=later)}, CORE_PLUS_FOR_ALICE, NOW, WINDOW
    )
    assert (change.kind, change.effective_at) == (ChangeKind.PACKAGE_CHANGED, later)


def test_back_to_no_package_when_the_last_subscription_goes() -> None:
    terms = CustomerTerms(user_first_seen={"alice": ago(100)})
    [change] = license_changes(
        [device("b1")], {user("alice"): held_alice("core_plus", 4)}, terms, NOW, WINDOW
    )
    assert (change.kind, change.package, change.previous_package, change.sequence) == (
        ChangeKind.PACKAGE_CHANGED,
        None,
        "core_plus",
        5,
    )


def test_a_basis_change_that_moves_the_license_to_another_package_is_a_package_change() -> None:
    """An unassigned kiosk (the customer's Core) given to Alice, over her allowance: it now
    has her Core+. Billing bills per package, so it is told; the event names the new basis."""
    devices = [device("b1", first=ago(50)), device("kiosk", first=ago(10))]
    held = {
        user("alice"): held_alice("core_plus"),
        dev("kiosk"): HeldLicense(True, Basis.UNASSIGNED, "core", 3, ago(10)),
    }
    changes = {
        c.subject: c for c in license_changes(devices, held, CORE_PLUS_FOR_ALICE, NOW, WINDOW)
    }
    kiosk = changes[dev("kiosk")]
    assert (kiosk.kind, kiosk.basis, kiosk.package, kiosk.previous_package, kiosk.sequence) == (
        ChangeKind.PACKAGE_CHANGED,
        Basis.OVER_ALLOWANCE,
        "core_plus",
        "core",
        4,
    )
    assert user("alice") not in changes


def test_a_basis_change_within_one_package_stays_without_an_event() -> None:
    terms = CustomerTerms(default_package="core", user_first_seen={"alice": ago(100)})
    devices = [device("b1", first=ago(50)), device("kiosk", first=ago(10))]
    held = {
        user("alice"): held_alice("core"),
        dev("kiosk"): HeldLicense(True, Basis.UNASSIGNED, "core", 3, ago(10)),
    }
    [kiosk] = license_changes(devices, held, terms, NOW, WINDOW)
    assert (kiosk.kind, kiosk.basis, kiosk.sequence) == (
        ChangeKind.BASIS_CHANGED,
        Basis.OVER_ALLOWANCE,
        0,
    )
    assert license_row(KEY, "acme", kiosk, EMITTED).event_id is None


def test_a_released_license_whose_package_would_change_changes_nothing() -> None:
    held = {user("alice"): HeldLicense(False, Basis.USER, "core", 2, ago(40))}
    silent = device("b1", last=ago(45))
    assert license_changes([silent], held, CORE_PLUS_FOR_ALICE, NOW, WINDOW) == []


def test_a_release_after_a_package_change_is_not_before_it() -> None:
    """The license row tells the package change's time (`last_event_at`); an uninstall
    reported late, older than the change, is released at the change."""
    changed_at = ago(1)
    row = {
        "active": True,
        "basis": "user",
        "package": "core_plus",
        "event_sequence": 2,
        "allocated_at": ago(10),
        "released_at": None,
        "last_event_at": changed_at,
    }
    held = held_license(row)
    assert held.last_event_at == changed_at
    gone = device("b1", protected=False, uninstalled=ago(3), last=ago(3))
    [release] = license_changes([gone], {user("alice"): held}, CORE_PLUS_FOR_ALICE, NOW, WINDOW)
    assert (release.kind, release.reason, release.effective_at, release.sequence) == (
        ChangeKind.RELEASED,
        Reason.UNINSTALLED,
        changed_at,
        3,
    )
    assert release.package == "core_plus"


# --- the settle window ----------------------------------------------------------------------


def test_a_package_change_while_the_allocation_is_pending_re_decides_the_allocation() -> None:
    """No package_changed follows a pending allocation: the allocation is withdrawn and the
    new one, with the new package, takes its number."""
    core_terms = CustomerTerms(default_package="core", user_first_seen={"alice": ago(100)})
    [first] = license_changes([device("b1", first=ago(0, minutes=20))], {}, core_terms, NOW, WINDOW)
    assert (first.kind, first.package, first.sequence) == (ChangeKind.ALLOCATED, "core", 1)
    held = {user("alice"): HeldLicense(True, Basis.USER, "core", 1, first.effective_at)}
    decision = settled_license_changes(
        [device("b1", first=ago(0, minutes=20))],
        held,
        CORE_PLUS_FOR_ALICE,
        NOW,
        WINDOW,
        pending={user("alice"): PendingAllocation(first, None)},
    )
    assert decision.withdrawn == [user("alice")]
    [again] = decision.changes
    assert (again.kind, again.package, again.sequence, again.effective_at) == (
        ChangeKind.ALLOCATED,
        "core_plus",
        1,
        first.effective_at,
    )
    assert all(c.kind is not ChangeKind.PACKAGE_CHANGED for c in decision.changes)


def test_an_allocation_followed_by_a_package_change_is_never_withdrawn() -> None:
    """A decision on a clock at which the allocation had settled wrote a package change after
    it (event #2). A decision on an earlier clock (another replica) still sees the allocation
    as unsettled: withdrawing it would leave #2 in the outbox with #1 gone. It is decided as
    held instead."""
    [first] = license_changes(
        [device("b1", first=ago(0, minutes=20))],
        {},
        CustomerTerms(default_package="core", user_first_seen={"alice": ago(100)}),
        NOW,
        WINDOW,
    )
    held = {user("alice"): held_alice("core_plus", 2, NOW)}
    decision = settled_license_changes(
        [device("b1", first=ago(0, minutes=20))],
        held,
        CustomerTerms(default_package="core", user_first_seen={"alice": ago(100)}),
        NOW,
        WINDOW,
        pending={user("alice"): PendingAllocation(first, None)},
    )
    assert decision.withdrawn == []
    [back] = decision.changes
    assert (back.kind, back.package, back.previous_package, back.sequence) == (
        ChangeKind.PACKAGE_CHANGED,
        "core",
        "core_plus",
        3,
    )


# --- the event ------------------------------------------------------------------------------


def package_change(sequence: int = 2) -> LicenseChange:
    return LicenseChange(
        ChangeKind.PACKAGE_CHANGED,
        *user("alice"),
        Basis.USER,
        Reason.SUBSCRIPTION_CHANGED,
        NOW,
        "core_plus",
        sequence,
        previous_package="core",
    )


def test_the_package_changed_event_payload() -> None:
    row = license_row(KEY, "acme", package_change(), EMITTED, EMITTED + timedelta(minutes=5))
    expected_id = license_event_id(KEY, "acme", PACKAGE_CHANGED, "user", "alice", NOW, sequence=2)
    assert row.event_id == expected_id
    assert (row.change, row.reason, row.package, row.event_sequence) == (
        "package_changed",
        "subscription_changed",
        "core_plus",
        2,
    )
    # Published at once: only allocations wait for the settle window.
    assert row.settles_at is None
    assert row.payload is not None
    assert orjson.loads(row.payload) == {
        "schema_version": 1,
        "event_id": expected_id,
        "type": PACKAGE_CHANGED,
        "customer_id": "acme",
        "subject_type": "user",
        "subject_id": "alice",
        "reason": "subscription_changed",
        "basis": "user",
        "package": "core_plus",
        "previous_package": "core",
        "effective_at": NOW.isoformat(),
        "emitted_at": EMITTED.isoformat(),
        "sequence": 2,
    }
    parsed = LICENSE_EVENT_ADAPTER.validate_json(row.payload)
    assert (parsed.type, parsed.package, parsed.previous_package, parsed.sequence) == (
        PACKAGE_CHANGED,
        "core_plus",
        "core",
        2,
    )


def test_two_package_changes_of_one_subject_are_two_events() -> None:
    """Core -> Core+ -> Core within one decision clock: numbers keep the ids apart."""
    there = license_row(KEY, "acme", package_change(2), EMITTED)
    back = license_row(KEY, "acme", package_change(3), EMITTED)
    assert there.event_id != back.event_id


# --- reconciliation -------------------------------------------------------------------------


def test_a_package_change_keeps_the_license_active_for_reconciliation() -> None:
    events = [event(ALLOCATED, 1), event(PACKAGE_CHANGED, 2)]
    assert problems([stored(True, 2)], events) == []
    assert problems([stored(False, 3)], [*events, event(RELEASED, 3)]) == []
    assert problems([stored(False, 2)], events) == ["last event is not license.released"]


def test_a_lost_package_change_is_a_gap() -> None:
    assert problems([stored(True, 2)], [event(ALLOCATED, 1)]) == ["event #2 is missing"]
    events = [event(ALLOCATED, 1), event(RELEASED, 3)]
    assert problems([stored(False, 3)], events) == ["events #2 are missing"]


def test_a_package_change_of_a_subject_not_stored_is_billed_but_not_stored() -> None:
    on_topic = events_by_subject([event(ALLOCATED, 1), event(PACKAGE_CHANGED, 2)])
    mismatches, _ = compare([], on_topic, set())
    assert [m.problem for m in mismatches] == ["billed but not stored"]


def test_package_changed_records_are_read_from_the_topic() -> None:
    payload = {
        "event_id": "e2",
        "type": PACKAGE_CHANGED,
        "customer_id": "acme",
        "subject_type": "user",
        "subject_id": "alice",
        "sequence": 2,
    }
    parsed = topic_event(orjson.dumps(payload), (1, 5))
    assert parsed is not None
    assert (parsed.event_type, parsed.sequence) == (PACKAGE_CHANGED, 2)

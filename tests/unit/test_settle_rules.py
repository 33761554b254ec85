"""`worker.licensing.rules`: effective times that keep a subject's intervals in order, and
allocations that stay provisional while they settle (`settled_license_changes`)."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given
from hypothesis import strategies as st

from tests.unit.test_license_rules import (
    ALLOCATED,
    NOW,
    RELEASED,
    WINDOW,
    ago,
    change,
    dev,
    device,
    fleets,
    user,
)
from worker.licensing.rules import (
    Basis,
    CustomerTerms,
    DeviceFacts,
    HeldLicense,
    LicenseChange,
    PendingAllocation,
    Reason,
    Subject,
    license_changes,
    settled_license_changes,
)

ALICE_SEEN = CustomerTerms(user_first_seen={"alice": ago(100)})


def pending(allocation: LicenseChange, settled: HeldLicense | None = None) -> PendingAllocation:
    return PendingAllocation(allocation, settled)


def held_as(allocation: LicenseChange) -> HeldLicense:
    """The license row an allocation wrote."""
    return HeldLicense(
        True, allocation.basis, allocation.package, allocation.sequence, allocation.effective_at
    )


# --- part 1: a kind that arrives late withdraws the allocation it caused --------------------


def test_heartbeat_without_kind_then_install_withdraws_the_over_allowance_allocation() -> None:
    laptop = device("b1", first=ago(0, minutes=10))
    phone_unknown = device("p1", kind=None, first=ago(0, minutes=5), last=ago(0, minutes=5))
    # Decided from the heartbeat alone: a second "business" device, over the allowance.
    [first] = [
        c
        for c in license_changes(
            [laptop, phone_unknown], {user("alice"): held_alice()}, ALICE_SEEN, NOW, WINDOW
        )
        if c.subject == dev("p1")
    ]
    assert (first.kind, first.basis) == (ALLOCATED, Basis.OVER_ALLOWANCE)
    # The install says personal, within the settle window.
    phone = device("p1", kind="personal", first=ago(0, minutes=6), last=ago(0, minutes=5))
    decision = settled_license_changes(
        [laptop, phone],
        {user("alice"): held_alice(), dev("p1"): held_as(first)},
        ALICE_SEEN,
        NOW,
        WINDOW,
        pending={dev("p1"): pending(first)},
    )
    assert decision.withdrawn == [dev("p1")]
    assert decision.changes == []


def held_alice() -> HeldLicense:
    return HeldLicense(True, Basis.USER, None, 1, ago(100))


def test_a_late_install_re_dates_a_pending_first_allocation() -> None:
    heartbeat = device("b1", first=ago(0, minutes=5), last=ago(0, minutes=5))
    terms = CustomerTerms(user_first_seen={"alice": ago(0, minutes=5)})
    [first] = license_changes([heartbeat], {}, terms, NOW, WINDOW)
    assert first.effective_at == ago(0, minutes=5)
    installed = device("b1", first=ago(0, minutes=9), last=ago(0, minutes=5))
    terms = CustomerTerms(user_first_seen={"alice": ago(0, minutes=9)})
    decision = settled_license_changes(
        [installed],
        {user("alice"): held_as(first)},
        terms,
        NOW,
        WINDOW,
        pending={user("alice"): pending(first)},
    )
    # The same number, the install's time: what one batch with both events decides.
    assert decision.withdrawn == [user("alice")]
    assert decision.changes == [
        change(ALLOCATED, user("alice"), Basis.USER, Reason.FIRST_SIGNAL, ago(0, minutes=9))
    ]
    assert decision.changes == license_changes([installed], {}, terms, NOW, WINDOW)


def test_a_pending_allocation_decided_the_same_way_stays_as_announced() -> None:
    devices = [device("b1", first=ago(0, minutes=9), last=ago(0, minutes=1))]
    terms = CustomerTerms(user_first_seen={"alice": ago(0, minutes=9)})
    [first] = license_changes(devices, {}, terms, NOW, WINDOW)
    decision = settled_license_changes(
        devices,
        {user("alice"): held_as(first)},
        terms,
        NOW,
        WINDOW,
        pending={user("alice"): pending(first)},
    )
    assert (decision.withdrawn, decision.changes) == ([], [])


def test_an_uninstall_within_the_window_withdraws_the_allocation() -> None:
    """Installed, then uninstalled hours later in event time, both decided within the settle
    window (a replay after an outage): decided as one batch with both would be, the device
    was never licensed."""
    terms = CustomerTerms(user_first_seen={"alice": ago(0, hours=9)})
    [first] = license_changes(
        [device("b1", first=ago(0, hours=9), last=ago(0, hours=9))], {}, terms, NOW, WINDOW
    )
    gone = device("b1", first=ago(0, hours=9), protected=False, last=ago(0, hours=1))
    decision = settled_license_changes(
        [gone],
        {user("alice"): held_as(first)},
        terms,
        NOW,
        WINDOW,
        pending={user("alice"): pending(first)},
    )
    assert (decision.withdrawn, decision.changes) == ([user("alice")], [])
    assert license_changes([gone], {}, terms, NOW, WINDOW) == []


def test_an_uninstall_no_later_than_the_allocation_withdraws_it() -> None:
    terms = CustomerTerms(user_first_seen={"alice": ago(0, hours=1)})
    [first] = license_changes(
        [device("b1", first=ago(0, hours=1), last=ago(0, hours=1))], {}, terms, NOW, WINDOW
    )
    # A late uninstall older than the signal that licensed the device: an empty interval.
    gone = device(
        "b1", first=ago(0, hours=1), protected=False, last=ago(0, hours=1), uninstalled=ago(1)
    )
    decision = settled_license_changes(
        [gone],
        {user("alice"): held_as(first)},
        terms,
        NOW,
        WINDOW,
        pending={user("alice"): pending(first)},
    )
    assert (decision.withdrawn, decision.changes) == ([user("alice")], [])


def test_a_withdrawn_reactivation_returns_to_the_release_billing_saw() -> None:
    released = HeldLicense(False, Basis.OVER_ALLOWANCE, None, 2, ago(3))
    laptop = device("b1", first=ago(50))
    second = device("b2", first=ago(10), kind=None, last=ago(0, minutes=5))
    [again] = [
        c
        for c in license_changes([laptop, second], {dev("b2"): released}, ALICE_SEEN, NOW, WINDOW)
        if c.subject == dev("b2")
    ]
    assert (again.reason, again.sequence) == (Reason.REACTIVATED, 3)
    personal = device("b2", first=ago(10), kind="personal", last=ago(0, minutes=5))
    decision = settled_license_changes(
        [laptop, personal],
        {user("alice"): held_alice(), dev("b2"): held_as(again)},
        ALICE_SEEN,
        NOW,
        WINDOW,
        pending={dev("b2"): pending(again, released)},
    )
    assert (decision.withdrawn, decision.changes) == ([dev("b2")], [])


# --- part 8: a subject's events take effect in their order ------------------------------------


def test_a_reallocation_never_takes_effect_before_the_previous_release() -> None:
    """The black-box finding: released covered_by_user on Feb 15, re-allocated from a signal
    of Feb 2. The re-allocation takes effect at the release."""
    released = HeldLicense(False, Basis.OVER_ALLOWANCE, None, 2, ago(0, hours=2))
    devices = [device("b1", first=ago(50)), device("b2", first=ago(10), last=ago(13))]
    held = {user("alice"): held_alice(), dev("b2"): released}
    [again] = license_changes(devices, held, ALICE_SEEN, NOW, WINDOW)
    assert (again.kind, again.effective_at, again.sequence) == (ALLOCATED, ago(0, hours=2), 3)


def test_a_release_never_takes_effect_before_its_allocation() -> None:
    held = HeldLicense(True, Basis.USER, None, 1, ago(0, hours=2))
    gone = device("b1", protected=False, last=ago(1))  # a late uninstall of yesterday
    [release] = license_changes([gone], {user("alice"): held}, ALICE_SEEN, NOW, WINDOW)
    assert (release.kind, release.effective_at) == (RELEASED, ago(0, hours=2))


def test_a_moved_device_licenses_its_new_user_from_the_move_not_its_first_sighting() -> None:
    moved = device("b1", user_id="bob", first=ago(20), last=ago(0, hours=1))
    terms = CustomerTerms(user_first_seen={"bob": ago(0, hours=3)})
    changes = license_changes(
        [moved],
        {user("alice"): HeldLicense(True, Basis.USER, None, 1, ago(20))},
        terms,
        NOW,
        WINDOW,
    )
    assert {(c.kind, c.subject, c.effective_at) for c in changes} == {
        (ALLOCATED, user("bob"), ago(0, hours=3)),
        (RELEASED, user("alice"), ago(0, hours=1)),
    }


def test_a_device_silent_longer_than_the_window_in_between_is_licensed_from_its_signal() -> None:
    returning = device("b1", first=ago(100), last=ago(0, hours=1))
    [allocated] = license_changes([returning], {}, ALICE_SEEN, NOW, WINDOW)
    assert allocated.effective_at == ago(0, hours=1)


@given(
    fleet=fleets(),
    offsets=st.lists(st.integers(min_value=-40 * 24, max_value=0), min_size=1, max_size=8),
)
def test_every_event_takes_effect_no_earlier_than_the_subjects_previous_one(
    fleet: list[DeviceFacts], offsets: list[int]
) -> None:
    devices = fleet
    subjects: list[Subject] = sorted(
        {dev(d.device_id) for d in devices} | {user(d.user_id) for d in devices if d.user_id}
    )
    held = {}
    for number, subject in enumerate(subjects):
        at = NOW + timedelta(hours=offsets[number % len(offsets)])
        is_active = number % 2 == 0
        basis = Basis.USER if subject[0].value == "user" else Basis.UNASSIGNED
        held[subject] = HeldLicense(is_active, basis, None, 2, at)
    for c in license_changes(devices, held, "user", NOW, WINDOW):
        previous = held[c.subject]
        if c.kind in (ALLOCATED, RELEASED):
            assert previous.last_event_at is not None
            assert c.effective_at >= previous.last_event_at
            assert c.sequence == previous.event_sequence + 1


# --- the stored form of a pending allocation ------------------------------------------------


def pending_row(sequence: int, released_at: object = None) -> dict[str, object]:
    from worker.licensing.decisions import license_event_json

    payload = license_event_json(
        event_id="e",
        event_type="license.allocated",
        customer_id="acme",
        subject_type="device",
        subject_id="b2",
        reason="reactivated" if sequence > 1 else "first_signal",
        basis="over_allowance",
        effective_at=ago(1),
        emitted_at=NOW,
        package="core",
        sequence=sequence,
    )
    return {
        "customer_id": "acme",
        "subject_type": "device",
        "subject_id": "b2",
        "event_id": "e",
        "payload": payload,
        "settled_basis": "unassigned" if released_at else None,
        "settled_package": None,
        "settled_released_at": released_at,
        "settled_reason": "covered_by_user" if released_at else None,
    }


def test_a_pending_allocation_is_read_back_as_the_change_it_announced() -> None:
    from worker.licensing.decisions import pending_allocation

    first = pending_allocation(pending_row(1))
    assert first is not None
    assert first.change == LicenseChange(
        ALLOCATED, *dev("b2"), Basis.OVER_ALLOWANCE, Reason.FIRST_SIGNAL, ago(1), "core", 1
    )
    assert first.settled is None
    again = pending_allocation(pending_row(3, ago(2)))
    assert again is not None
    assert again.settled == HeldLicense(False, Basis.UNASSIGNED, None, 2, ago(2))
    # A reactivation whose release the history no longer shows settles as it is.
    assert pending_allocation(pending_row(3)) is None

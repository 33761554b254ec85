"""`worker.licensing.billing_fold`: the reference billing consumer's fold of the topic."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from worker.licensing.billing_fold import (
    BillingFold,
    Interval,
    end_of_day,
    license_event,
    usage_snapshot,
)

DAY0 = datetime(2026, 12, 1, tzinfo=UTC)
ALICE = ("acme", "user", "alice@acme.example")
KIOSK = ("acme", "device", "kiosk-1")


def at(days: float) -> datetime:
    return DAY0 + timedelta(days=days)


def wire(
    event_type: str,
    sequence: int | None,
    effective: float,
    *,
    decided: float | None = None,
    subject: tuple[str, str, str] = ALICE,
    package: str | None = "core",
    event_id: str | None = None,
) -> dict[str, Any]:
    customer_id, subject_type, subject_id = subject
    return {
        "schema_version": 1,
        "event_id": event_id or f"{subject_id}-{event_type}-{sequence}-{effective}",
        "type": event_type,
        "customer_id": customer_id,
        "subject_type": subject_type,
        "subject_id": subject_id,
        "reason": "first_signal",
        "basis": "user",
        "package": package,
        "sequence": sequence,
        "effective_at": at(effective).isoformat(),
        "emitted_at": at(effective if decided is None else decided).isoformat(),
    }


def folded(*events: dict[str, Any]) -> BillingFold:
    fold = BillingFold()
    for event in events:
        parsed = license_event(event)
        if parsed is not None:
            fold.add(*parsed)
    return fold


def test_allocated_opens_and_released_closes_in_number_order_whatever_the_arrival() -> None:
    fold = folded(
        wire("license.released", 2, 5),
        wire("license.allocated", 1, 1),
        wire("license.allocated", 3, 8),
    )
    assert fold.intervals()[ALICE] == [
        Interval(at(1), at(5), "core"),
        Interval(at(8), None, "core"),
    ]
    assert fold.anomalies() == []


def test_a_redelivered_event_id_counts_once() -> None:
    allocated = wire("license.allocated", 1, 1)
    fold = folded(allocated, allocated, wire("license.released", 2, 3), allocated)
    assert fold.events == 2
    assert fold.duplicates == 2
    assert fold.intervals()[ALICE] == [Interval(at(1), at(3), "core")]


def test_package_changed_continues_the_license_under_the_new_package() -> None:
    fold = folded(
        wire("license.allocated", 1, 1, package="core"),
        wire("license.package_changed", 2, 4, package="core_plus"),
        wire("license.package_changed", 3, 6, package=None),
        wire("license.released", 4, 9, package=None),
    )
    assert fold.intervals()[ALICE] == [
        Interval(at(1), at(4), "core"),
        Interval(at(4), at(6), "core_plus"),
        Interval(at(6), at(9), "none"),
    ]
    bill = fold.daily_bill([date(2026, 12, 2), date(2026, 12, 5), date(2026, 12, 8)])
    assert bill[date(2026, 12, 2)] == Counter({("acme", "core"): 1})
    assert bill[date(2026, 12, 5)] == Counter({("acme", "core_plus"): 1})
    assert bill[date(2026, 12, 8)] == Counter({("acme", "none"): 1})


def test_the_end_of_a_day_counts_the_changes_at_midnight() -> None:
    """Changes at or before the instant apply, as in `report usage --as-of`."""
    fold = folded(
        wire("license.allocated", 1, 1),  # Dec 2, 00:00: counts at the end of Dec 1
        wire("license.allocated", 1, 2, subject=KIOSK),
        wire("license.released", 2, 3, subject=KIOSK),  # Dec 4, 00:00: not at the end of Dec 3
    )
    assert end_of_day(date(2026, 12, 1)) == at(1)
    bill = fold.daily_bill([date(2026, 11, 30), date(2026, 12, 1), date(2026, 12, 3)])
    assert bill[date(2026, 11, 30)] == Counter()
    assert bill[date(2026, 12, 1)] == Counter({("acme", "core"): 1})
    assert bill[date(2026, 12, 3)] == Counter({("acme", "core"): 1})


def test_known_at_counts_by_decision_time_and_held_at_by_effective_time() -> None:
    """A release through silence takes effect at last signal + 30 days and is decided at
    the next sweep: billed from its effect, known to the service from its decision."""
    fold = folded(
        wire("license.allocated", 1, 0.5, decided=0.5),
        wire("license.released", 2, 30.5, decided=31.2),
    )
    instant = end_of_day(date(2026, 12, 31))  # Jan 1 00:00 = day 31
    assert fold.held_at([instant])[instant] == Counter()
    assert fold.known_at([instant])[instant] == Counter({("acme", "core"): 1})
    later = at(31.2)
    assert fold.known_at([later])[later] == Counter()


def test_a_purged_user_who_returns_starts_a_new_life_numbered_from_one() -> None:
    fold = folded(
        wire("license.allocated", 1, 1),
        wire("license.released", 2, 30),
        {**wire("user.purged", None, 120), "subject_id": "purged-0b6f"},
        wire("license.allocated", 1, 150),
    )
    assert fold.intervals()[ALICE] == [
        Interval(at(1), at(30), "core"),
        Interval(at(150), None, "core"),
    ]
    assert fold.anomalies() == []
    assert fold.subjects == 1  # the purge's pseudonym is not a license subject


def test_gaps_and_conflicting_numbers_are_anomalies() -> None:
    fold = folded(
        wire("license.allocated", 1, 1),
        wire("license.allocated", 3, 5),
        wire("license.allocated", 1, 2, subject=KIOSK),
        wire("license.allocated", 1, 3, subject=KIOSK),  # same number, another event
    )
    problems = {(a.subject_id, a.problem) for a in fold.anomalies()}
    assert problems == {
        ("alice@acme.example", "event #2 is missing"),
        ("alice@acme.example", "#3 allocates a license already held"),
        ("kiosk-1", "two events numbered #1 (allocated, allocated)"),
    }


def test_an_allocation_effective_before_the_previous_release_overlaps_and_is_an_anomaly() -> None:
    fold = folded(
        wire("license.allocated", 1, 1),
        wire("license.released", 2, 5),
        wire("license.allocated", 3, 4),  # would bill days 4 to 5 twice
    )
    assert [a.problem for a in fold.anomalies()] == [
        "#3 allocated takes effect before the previous interval ended"
    ]


def test_a_release_of_nothing_is_an_anomaly_and_counts_nothing() -> None:
    fold = folded(wire("license.released", 4, 2))
    assert [a.problem for a in fold.anomalies()] == ["#4 released of a license not held"]
    assert fold.intervals()[ALICE] == []
    assert fold.held_at([at(3)])[at(3)] == Counter()


def test_counts_per_customer_and_package_at_many_instants() -> None:
    other = ("globex", "device", "kiosk-9")
    fold = folded(
        wire("license.allocated", 1, 1),
        wire("license.allocated", 1, 1, subject=KIOSK, package="core_plus"),
        wire("license.allocated", 1, 2, subject=other, package=None),
        wire("license.released", 2, 4, subject=KIOSK, package="core_plus"),
    )
    held = fold.held_at([at(0), at(1), at(3), at(5)])
    assert held[at(0)] == Counter()
    assert held[at(1)] == Counter({("acme", "core"): 1, ("acme", "core_plus"): 1})
    assert held[at(3)] == Counter(
        {("acme", "core"): 1, ("acme", "core_plus"): 1, ("globex", "none"): 1}
    )
    assert held[at(5)] == Counter({("acme", "core"): 1, ("globex", "none"): 1})
    assert fold.customers() == {"acme", "globex"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"subject_type": "subscription"}, "subject_type"),
        ({"sequence": 0}, "sequence"),
        ({"sequence": True}, "sequence"),
        ({"sequence": "1"}, "sequence"),
        ({"package": "gold"}, "package"),
        ({"effective_at": "2026-12-01T00:00:00"}, "time zone"),
        ({"emitted_at": "yesterday"}, "ISO 8601"),
        ({"customer_id": None}, "customer_id"),
        ({"event_id": 7}, "event_id"),
    ],
)
def test_a_license_event_billing_cannot_trust_is_refused(
    change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        license_event({**wire("license.allocated", 1, 1), **change})


def test_other_event_types_are_not_license_events() -> None:
    assert license_event({"type": "subscription.attached"}) is None
    assert license_event({"type": "user.erased"}) is None
    assert usage_snapshot({"type": "license.allocated"}) is None


def test_a_usage_snapshot_gives_its_total_per_package() -> None:
    snapshot = usage_snapshot(
        {
            "type": "usage.snapshot",
            "event_id": "s1",
            "customer_id": "acme",
            "day": "2026-12-02",
            "taken_at": "2026-12-02T00:05:00+00:00",
            "by_package": {
                "core": {"licensed_users": 2, "device_licenses": 1, "total_licenses": 3},
                "none": {"licensed_users": 0, "device_licenses": 1, "total_licenses": 1},
            },
        }
    )
    assert snapshot is not None
    assert snapshot.day == date(2026, 12, 2)
    assert snapshot.taken_at == at(1) + timedelta(minutes=5)
    assert snapshot.by_package == {"core": 3, "none": 1}
    with pytest.raises(ValueError, match="total"):
        usage_snapshot(
            {
                "type": "usage.snapshot",
                "by_package": {"core": {"total_licenses": -1}},
            }
        )

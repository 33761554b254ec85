"""`worker.licensing.reconcile_days`: which instants are compared, and what differs."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime, timedelta

import click
import pytest

from worker.commands.reconcile_days import parse_day
from worker.licensing.billing_fold import UsageSnapshot, end_of_day
from worker.licensing.reconcile_days import (
    MAX_DAYS,
    CountDifference,
    compare_counts,
    days_between,
    instants,
)

DAY = date(2026, 12, 2)
END = end_of_day(DAY)
TAKEN = datetime(2026, 12, 2, 0, 5, tzinfo=UTC)


def snapshot(**by_package: int) -> UsageSnapshot:
    return UsageSnapshot("s1", "acme", DAY, TAKEN, by_package)


def test_every_customer_is_compared_at_each_days_end_and_at_its_snapshot() -> None:
    checks = instants(["globex", "acme"], [DAY], {("acme", DAY): snapshot(core=2)})
    assert [(c.customer_id, c.at, c.snapshot) for c in checks] == [
        ("acme", TAKEN, {"core": 2}),
        ("acme", END, None),
        ("globex", END, None),
    ]


def test_counts_that_agree_are_no_difference() -> None:
    checks = instants(["acme"], [DAY], {("acme", DAY): snapshot(core=2)})
    topic = {TAKEN: Counter({("acme", "core"): 2}), END: Counter({("acme", "core"): 3})}
    report = {TAKEN: {"acme": {"core": 2}}, END: {"acme": {"core": 3}}}
    assert compare_counts(checks, topic, report, {}) == ([], 2, 0)


def test_a_difference_names_customer_day_package_and_every_count() -> None:
    checks = instants(["acme"], [DAY], {("acme", DAY): snapshot(core=2, none=1)})
    topic = {TAKEN: Counter({("acme", "core"): 2}), END: Counter({("acme", "core_plus"): 1})}
    report = {TAKEN: {"acme": {"core": 2, "none": 1}}, END: {}}
    differences, compared, pending = compare_counts(checks, topic, report, {})
    assert (compared, pending) == (2, 0)
    assert differences == [
        CountDifference("acme", DAY, "none", TAKEN, topic=0, snapshot=1, report=1),
        CountDifference("acme", DAY, "core_plus", END, topic=1, snapshot=None, report=0),
    ]


def test_a_snapshot_alone_that_differs_is_a_difference() -> None:
    checks = instants(["acme"], [DAY], {("acme", DAY): snapshot(core=5)})
    topic = {TAKEN: Counter({("acme", "core"): 2}), END: Counter({("acme", "core"): 2})}
    report = {TAKEN: {"acme": {"core": 2}}, END: {"acme": {"core": 2}}}
    [difference] = compare_counts(checks, topic, report, {})[0]
    assert (difference.at, difference.topic, difference.snapshot, difference.report) == (
        TAKEN,
        2,
        5,
        2,
    )


def test_instants_from_an_unpublished_decision_on_are_pending() -> None:
    checks = instants(["acme"], [DAY], {("acme", DAY): snapshot(core=1)})
    topic = {TAKEN: Counter({("acme", "core"): 1}), END: Counter()}
    report = {TAKEN: {"acme": {"core": 1}}, END: {"acme": {"core": 1}}}
    pending_from = {"acme": TAKEN + timedelta(hours=1)}
    assert compare_counts(checks, topic, report, pending_from) == ([], 1, 1)


def test_days_between_includes_both_ends_and_refuses_a_backwards_or_huge_range() -> None:
    assert days_between(DAY, DAY + timedelta(days=2)) == [
        DAY,
        DAY + timedelta(days=1),
        DAY + timedelta(days=2),
    ]
    with pytest.raises(ValueError, match="before"):
        days_between(DAY, DAY - timedelta(days=1))
    with pytest.raises(ValueError, match="at most"):
        days_between(DAY, DAY + timedelta(days=MAX_DAYS))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-12-02", DAY),
        ("2026-12-02T23:59:00Z", DAY),
        ("2026-12-03T01:00:00+02:00", DAY),  # its UTC date
    ],
)
def test_a_day_is_a_date_or_a_time_with_a_zone(text: str, expected: date) -> None:
    assert parse_day(text, "--from") == expected


@pytest.mark.parametrize("text", ["2026-12-02T10:00:00", "yesterday", "2026-13-01"])
def test_a_day_without_a_zone_or_unreadable_is_refused(text: str) -> None:
    with pytest.raises(click.BadParameter):
        parse_day(text, "--from")

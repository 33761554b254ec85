"""Subscription packages, customer status and the usage totals: pure rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.licensing.rules import (
    Basis,
    ChangeKind,
    CustomerTerms,
    DeviceFacts,
    HeldLicense,
    Reason,
    SubjectType,
    license_changes,
)
from worker.licensing.subscription_rules import (
    LiveSubscription,
    highest_package,
    package_attribution,
    status_event_type,
)
from worker.licensing.usage import LicenseCount, usage_totals

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
WINDOW = timedelta(days=30)
USER = SubjectType.USER
DEVICE = SubjectType.DEVICE


def device(
    device_id: str, user_id: str | None, kind: str = "business", days: int = 1
) -> DeviceFacts:
    seen = NOW - timedelta(days=days)
    return DeviceFacts(device_id, user_id, kind, True, seen, seen)


# --- package precedence ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("packages", "expected"),
    [
        ([], None),
        (["core"], "core"),
        (["core", "core_plus"], "core_plus"),
        (["core_plus", "core", "core"], "core_plus"),
    ],
)
def test_the_highest_package_wins(packages: list[str], expected: str | None) -> None:
    assert highest_package(packages) == expected


def test_group_subscription_beats_the_customer_default_and_the_highest_group_wins() -> None:
    subscriptions = [
        LiveSubscription(None, "core_plus"),
        LiveSubscription("helpdesk", "core"),
        LiveSubscription("admins", "core_plus"),
    ]
    default, users = package_attribution(
        subscriptions,
        {
            "ann": ["helpdesk"],  # only a core group: core, although the default is core+
            "bob": ["helpdesk", "admins"],  # two groups: the higher package
            "cat": ["no-subscription-group"],  # a group without subscription: the default
        },
    )
    assert default == "core_plus"
    assert users == {"ann": "core", "bob": "core_plus"}


def test_without_customer_subscription_there_is_no_default() -> None:
    default, users = package_attribution([LiveSubscription("g", "core")], {"ann": ["g"]})
    assert (default, users) == (None, {"ann": "core"})


@given(st.lists(st.sampled_from(["core", "core_plus"]), min_size=1), st.randoms())
def test_precedence_does_not_depend_on_order(packages: list[str], rng: object) -> None:
    shuffled = list(packages)
    rng.shuffle(shuffled)  # type: ignore[attr-defined]
    subscriptions = [LiveSubscription(f"g{i}", p) for i, p in enumerate(packages)]
    groups = [f"g{i}" for i in range(len(packages))]
    _, forward = package_attribution(subscriptions, {"u": groups})
    _, backward = package_attribution(list(reversed(subscriptions)), {"u": groups[::-1]})
    assert forward == backward == {"u": highest_package(shuffled)}


@pytest.mark.parametrize(
    ("previous", "status", "expected"),
    [
        ("in_trial", "active", "subscription.activated"),
        (None, "active", "subscription.activated"),
        ("active", "cancelled", "subscription.cancelled"),
        ("in_trial", "in_trial", "subscription.trial_changed"),  # trial extended
        ("active", "active", None),
        ("cancelled", "cancelled", None),
    ],
)
def test_status_events(previous: str | None, status: str, expected: str | None) -> None:
    assert status_event_type(previous, status) == expected


# --- license decisions with terms -------------------------------------------------------------


def test_licenses_carry_the_package_of_their_user_or_the_default() -> None:
    devices = [
        device("laptop", "ann"),
        device("desktop", "ann", days=2),  # second business device: over allowance
        device("kiosk", None),
    ]
    terms = CustomerTerms(default_package="core", user_packages={"ann": "core_plus"})
    changes = license_changes(devices, {}, terms, NOW, WINDOW)
    assert {(c.subject_id, c.basis, c.package) for c in changes} == {
        ("ann", Basis.USER, "core_plus"),
        ("laptop", Basis.OVER_ALLOWANCE, "core_plus"),
        ("kiosk", Basis.UNASSIGNED, "core"),
    }


def test_a_package_change_alone_is_a_package_change() -> None:
    held = {(USER, "ann"): HeldLicense(True, Basis.USER, "core")}
    terms = CustomerTerms(default_package="core", user_packages={"ann": "core_plus"})
    [change] = license_changes([device("laptop", "ann")], held, terms, NOW, WINDOW)
    assert (change.kind, change.package, change.effective_at) == (
        ChangeKind.PACKAGE_CHANGED,
        "core_plus",
        NOW,
    )


def test_an_inactive_customer_holds_nothing_and_releases_at_the_inactivation() -> None:
    inactivated_at = NOW - timedelta(hours=2)
    held = {
        (USER, "ann"): HeldLicense(True, Basis.USER, "core"),
        (DEVICE, "kiosk"): HeldLicense(True, Basis.UNASSIGNED, "core"),
    }
    terms = CustomerTerms(active=False, status_changed_at=inactivated_at)
    changes = license_changes(
        [device("laptop", "ann"), device("kiosk", None)], held, terms, NOW, WINDOW
    )
    assert {(c.kind, c.subject_id, c.reason, c.effective_at, c.package) for c in changes} == {
        (ChangeKind.RELEASED, "ann", Reason.CUSTOMER_INACTIVATED, inactivated_at, "core"),
        (ChangeKind.RELEASED, "kiosk", Reason.CUSTOMER_INACTIVATED, inactivated_at, "core"),
    }


def test_signals_of_an_inactive_customer_license_nothing() -> None:
    terms = CustomerTerms(active=False, status_changed_at=NOW - timedelta(days=1))
    assert license_changes([device("new", "zed", days=0)], {}, terms, NOW, WINDOW) == []


def test_reactivation_allocates_no_earlier_than_the_reactivation() -> None:
    """Otherwise the new allocation could take the id of the one before the inactivation."""
    reactivated_at = NOW - timedelta(hours=1)
    held = {(USER, "ann"): HeldLicense(False, Basis.USER)}
    terms = CustomerTerms(status_changed_at=reactivated_at)
    [change] = license_changes([device("laptop", "ann", days=3)], held, terms, NOW, WINDOW)
    assert (change.kind, change.reason, change.effective_at) == (
        ChangeKind.ALLOCATED,
        Reason.REACTIVATED,
        reactivated_at,
    )


# --- usage totals ---------------------------------------------------------------------------


def test_usage_totals_count_each_license_once_under_its_package() -> None:
    totals = usage_totals(
        [
            LicenseCount("user", "user", "core", 3),
            LicenseCount("user", "user", "core_plus", 2),
            LicenseCount("device", "unassigned", "core", 4),
            LicenseCount("device", "over_allowance", "core_plus", 1),
            LicenseCount("device", "device_model", None, 5),
            LicenseCount("user", "user", None, 0),
        ]
    ).as_dict()
    assert totals == {
        "licensed_users": 5,
        "device_licenses": 10,
        "device_licenses_by_reason": {"unassigned": 4, "over_allowance": 1, "device_model": 5},
        "total_licenses": 15,
        "by_package": {
            "core": {"licensed_users": 3, "device_licenses": 4, "total_licenses": 7},
            "core_plus": {"licensed_users": 2, "device_licenses": 1, "total_licenses": 3},
            "none": {"licensed_users": 0, "device_licenses": 5, "total_licenses": 5},
        },
    }


def test_a_customer_without_licenses_has_zero_totals() -> None:
    totals = usage_totals([LicenseCount("user", "user", None, 0)]).as_dict()
    assert (totals["total_licenses"], totals["by_package"]) == (0, {})

"""`worker.report.rows`: why each user and device of the usage report is licensed or not."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from worker.report.rows import (
    DeviceState,
    device_status,
    history_row,
    history_status,
    live_row,
    user_status,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
WINDOW = timedelta(days=30)
RECENT = NOW - timedelta(days=2)
SILENT = NOW - WINDOW  # exactly the window: no longer counts


def device(**changes: Any) -> DeviceState:
    values: dict[str, Any] = {
        "protected": True,
        "last_seen_at": RECENT,
        "license_active": False,
        "basis": None,
        "user_licensed": True,
        "customer_active": True,
    }
    return DeviceState(**{**values, **changes})


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (device(license_active=True, basis="over_allowance"), "over_allowance"),
        (device(license_active=True, basis="unassigned", user_licensed=False), "unassigned"),
        (device(license_active=True, basis="device_model"), "device_model"),
        # The license rows are the truth: a silent device keeps its license until the sweep.
        (device(license_active=True, basis="unassigned", last_seen_at=SILENT), "unassigned"),
        (device(), "covered_by_user"),
        (device(protected=False), "uninstalled"),
        (device(last_seen_at=SILENT), "inactive"),
        (device(last_seen_at=SILENT + timedelta(seconds=1)), "covered_by_user"),
        (device(protected=False, last_seen_at=SILENT), "uninstalled"),
        (device(customer_active=False), "customer_inactivated"),
        (device(customer_active=False, protected=False), "customer_inactivated"),
        # A released license is not held: explained from the facts.
        (device(basis="unassigned", user_licensed=False, last_seen_at=SILENT), "inactive"),
        # Counts by its facts, yet nothing holds it: a decision not made yet.
        (device(user_licensed=False), "not_licensed"),
    ],
)
def test_device_status(state: DeviceState, expected: str) -> None:
    assert device_status(state, NOW, WINDOW) == expected


@pytest.mark.parametrize(
    ("active", "reason", "purged", "expected"),
    [
        (True, None, False, "licensed"),
        (False, "inactive_30d", False, "released:inactive_30d"),
        (False, "customer_inactivated", False, "released:customer_inactivated"),
        (False, "inactive_30d", True, "purged"),
        (None, None, False, "not_counted"),
    ],
)
def test_user_status(active: bool | None, reason: str | None, purged: bool, expected: str) -> None:
    assert user_status(active, reason, purged) == expected


@pytest.mark.parametrize(
    ("subject_type", "change", "basis", "reason", "expected"),
    [
        ("user", "allocated", "user", "first_signal", "licensed"),
        ("user", "package_changed", "user", None, "licensed"),
        ("device", "allocated", "unassigned", "reactivated", "unassigned"),
        ("device", "basis_changed", "over_allowance", None, "over_allowance"),
        ("device", "released", "unassigned", "covered_by_user", "released:covered_by_user"),
        ("user", "released", "user", "inactive_30d", "released:inactive_30d"),
        ("user", "purged", "user", "retention_90d", "purged"),
    ],
)
def test_history_status(
    subject_type: str, change: str, basis: str, reason: str | None, expected: str
) -> None:
    assert history_status(subject_type, change, basis, reason) == expected


def live_record(**changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "customer_id": "acme",
        "subject_type": "device",
        "subject_id": "dev-1",
        "user_id": None,
        "device_kind": None,
        "protected": True,
        "last_seen_at": RECENT,
        "customer_status": "active",
        "license_active": None,
        "basis": None,
        "package": None,
        "release_reason": None,
        "purged_at": None,
        "user_licensed": False,
        "devices_covered": None,
    }
    return {**values, **changes}


def test_live_device_row_shows_the_kind_the_rules_count_and_no_package_when_released() -> None:
    row = live_row(
        live_record(license_active=False, basis="unassigned", package="core"), NOW, WINDOW
    )
    assert (row.device_kind, row.licensed, row.basis, row.package) == (
        "business",
        False,
        "unassigned",
        None,
    )
    assert row.status == "not_licensed"
    assert type(row.status) is str


def test_live_user_row_carries_its_package_and_covered_devices() -> None:
    row = live_row(
        live_record(
            subject_type="user",
            subject_id="ann",
            user_id="ann",
            protected=None,
            license_active=True,
            basis="user",
            package="core_plus",
            devices_covered=3,
            user_licensed=None,
        ),
        NOW,
        WINDOW,
    )
    assert (row.licensed, row.status, row.package, row.devices_covered, row.device_kind) == (
        True,
        "licensed",
        "core_plus",
        3,
        None,
    )


HISTORY_DEVICE: dict[str, Any] = {
    "customer_id": "acme",
    "subject_type": "device",
    "subject_id": "dev-1",
    "user_id": "ann",
    "device_kind": None,
    "protected": True,
    "last_seen_at": RECENT,
    "last_seen_exact": False,
    "change": None,
    "basis": None,
    "reason": None,
    "package": None,
    "user_licensed": True,
}


def history_device(**changes: Any) -> dict[str, Any]:
    return {**HISTORY_DEVICE, **changes}


def test_history_row_of_a_released_device_license_keeps_its_release() -> None:
    row = history_row(
        history_device(
            change="released", basis="over_allowance", reason="inactive_30d", package="core"
        ),
        NOW,
        WINDOW,
    )
    assert (row.licensed, row.status, row.basis, row.package) == (
        False,
        "released:inactive_30d",
        "over_allowance",
        None,
    )
    assert (row.user_id, row.device_kind, row.last_seen_at, row.last_seen_exact) == (
        "ann",
        "business",  # a kind never reported counts as business, as live
        RECENT,
        False,
    )
    assert row.devices_covered is None


def test_history_row_of_a_device_license_stored_before_the_device_history() -> None:
    """A device license decided before migration 0012: no user, kind or last seen then."""
    row = history_row(
        history_device(
            user_id=None,
            device_kind=None,
            protected=None,
            last_seen_at=None,
            last_seen_exact=None,
            change="allocated",
            basis="unassigned",
            package="core",
            user_licensed=False,
        ),
        NOW,
        WINDOW,
    )
    assert (row.licensed, row.status, row.package) == (True, "unassigned", "core")
    assert (row.user_id, row.device_kind, row.last_seen_at, row.last_seen_exact) == (
        None,
        None,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("changes", "status"),
    [
        ({}, "covered_by_user"),
        ({"protected": False}, "uninstalled"),
        ({"user_licensed": False}, "not_licensed"),
        # Silent past the window only when the last signal is known exactly.
        ({"last_seen_at": SILENT, "last_seen_exact": True}, "inactive"),
        ({"last_seen_at": SILENT, "last_seen_exact": False}, "covered_by_user"),
        (
            {"last_seen_at": SILENT + timedelta(seconds=1), "last_seen_exact": True},
            "covered_by_user",
        ),
        ({"protected": False, "last_seen_at": SILENT, "last_seen_exact": True}, "uninstalled"),
    ],
)
def test_history_row_of_a_device_without_a_license_says_why_from_its_facts_then(
    changes: dict[str, Any], status: str
) -> None:
    row = history_row(history_device(**changes), NOW, WINDOW)
    assert (row.licensed, row.status, row.basis) == (False, status, None)


def test_history_row_of_a_user_without_a_license_decision_was_not_counted() -> None:
    row = history_row(
        history_device(
            subject_type="user",
            subject_id="ann",
            device_kind=None,
            protected=None,
            user_licensed=None,
        ),
        NOW,
        WINDOW,
    )
    assert (row.user_id, row.licensed, row.status, row.last_seen_at) == (
        "ann",
        False,
        "not_counted",
        RECENT,
    )

"""The rows of the usage report, as pure functions: for every user and device, whether it
holds a license and, if not, why not. No I/O; `worker/report/build.py` reads the database.

The license rows are the truth for "licensed" (what billing is charged for). Why a device
holds none is derived from its facts, in this order: the customer is inactive, the device
is uninstalled, it has been silent past the release window, its user's license covers it;
a device that counts by its facts yet holds nothing is `not_licensed` (a decision not made
yet, which the next signal or sweep makes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from worker.licensing.rules import DEFAULT_KIND, SubjectType

# The history changes after which a subject holds a license.
LICENSED_CHANGES = frozenset({"allocated", "basis_changed", "package_changed"})


class UserStatus(StrEnum):
    LICENSED = "licensed"
    PURGED = "purged"
    # Never held a license: no counting device, users not counted (device model), or the
    # customer inactive since before their first signal. A released user is
    # `released:<reason>`.
    NOT_COUNTED = "not_counted"


class DeviceStatus(StrEnum):
    # Licensed devices show their basis: unassigned, over_allowance, device_model.
    COVERED_BY_USER = "covered_by_user"
    UNINSTALLED = "uninstalled"
    INACTIVE = "inactive"
    CUSTOMER_INACTIVATED = "customer_inactivated"
    NOT_LICENSED = "not_licensed"


@dataclass(frozen=True, slots=True)
class Customer:
    customer_id: str
    name: str | None
    # Today's values; None in an as-of report (their history is not kept).
    status: str | None
    license_model: str | None


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One user or device. `basis` is the license held, or last held (None: never one);
    `package` is set for licensed rows only."""

    customer_id: str
    subject_type: str
    subject_id: str
    # A device's user; a user row repeats its own id, so filtering by user shows both.
    user_id: str | None
    device_kind: str | None
    licensed: bool
    status: str
    basis: str | None
    package: str | None
    last_seen_at: datetime | None
    devices_covered: int | None
    # Whether `last_seen_at` is the subject's last signal (always, live). As of a past time,
    # false means a lower bound: a signal at or before then, maybe not the last one.
    last_seen_exact: bool | None = None


COLUMNS: tuple[str, ...] = tuple(field.name for field in fields(ReportRow))


@dataclass(frozen=True, slots=True)
class DeviceState:
    protected: bool
    last_seen_at: datetime
    license_active: bool
    basis: str | None
    user_licensed: bool
    customer_active: bool


def device_status(device: DeviceState, now: datetime, window: timedelta) -> str:
    if device.license_active and device.basis is not None:
        return device.basis
    if not device.customer_active:
        return DeviceStatus.CUSTOMER_INACTIVATED
    if not device.protected:
        return DeviceStatus.UNINSTALLED
    if now - device.last_seen_at >= window:  # the same boundary as license_rules.counts
        return DeviceStatus.INACTIVE
    if device.user_licensed:
        return DeviceStatus.COVERED_BY_USER
    return DeviceStatus.NOT_LICENSED


def user_status(license_active: bool | None, release_reason: str | None, purged: bool) -> str:
    """`license_active` None: the user never held a license."""
    if license_active is None:
        return UserStatus.NOT_COUNTED
    if license_active:
        return UserStatus.LICENSED
    if purged:
        return UserStatus.PURGED
    return f"released:{release_reason}"


def live_row(record: Mapping[str, Any], now: datetime, window: timedelta) -> ReportRow:
    """A row of the `report_live_rows` query, explained as of `now`."""
    licensed = bool(record["license_active"])
    if record["subject_type"] == SubjectType.USER:
        status = user_status(
            record["license_active"], record["release_reason"], record["purged_at"] is not None
        )
        kind = None
    else:
        state = DeviceState(
            protected=record["protected"],
            last_seen_at=record["last_seen_at"],
            license_active=licensed,
            basis=record["basis"],
            user_licensed=bool(record["user_licensed"]),
            customer_active=record["customer_status"] == "active",
        )
        status = device_status(state, now, window)
        kind = record["device_kind"] or DEFAULT_KIND
    return ReportRow(
        customer_id=record["customer_id"],
        subject_type=record["subject_type"],
        subject_id=record["subject_id"],
        user_id=record["user_id"],
        device_kind=kind,
        licensed=licensed,
        status=str(status),
        basis=record["basis"],
        package=record["package"] if licensed else None,
        last_seen_at=record["last_seen_at"],
        devices_covered=record["devices_covered"],
        last_seen_exact=record["last_seen_at"] is not None or None,
    )


def history_status(subject_type: str, change: str, basis: str, reason: str | None) -> str:
    """The status a subject had after its latest license change."""
    if change in LICENSED_CHANGES:
        return UserStatus.LICENSED if subject_type == SubjectType.USER else basis
    if change == "purged":
        return UserStatus.PURGED
    return f"released:{reason}"


def history_device_status(
    *,
    protected: bool | None,
    last_seen_at: datetime | None,
    last_seen_exact: bool | None,
    user_licensed: bool,
    as_of: datetime,
    window: timedelta,
) -> str:
    """Why a device held no license of its own as of a past time, from its facts then: not
    installed, silent past the window (only when its last signal is known exactly), covered
    by its user's license, or `not_licensed` (held none for a reason not kept: a customer
    inactive then, or a decision not made yet)."""
    if protected is False:
        return DeviceStatus.UNINSTALLED
    if last_seen_exact and last_seen_at is not None and as_of - last_seen_at >= window:
        return DeviceStatus.INACTIVE
    if user_licensed:
        return DeviceStatus.COVERED_BY_USER
    return DeviceStatus.NOT_LICENSED


def history_row(record: Mapping[str, Any], as_of: datetime, window: timedelta) -> ReportRow:
    """A row of the `report_history_rows` query: the license state as decided by `as_of`,
    a device's user, kind and install state as recorded by then, and the newest signal at
    or before then that is stored (`last_seen_exact` false: maybe not the last one).
    `change` is None for a subject without a license decision by then."""
    change = record["change"]
    licensed = change in LICENSED_CHANGES
    subject_type = record["subject_type"]
    if change is not None:
        status = history_status(subject_type, change, record["basis"], record["reason"])
    elif subject_type == SubjectType.USER:
        status = UserStatus.NOT_COUNTED
    else:
        status = history_device_status(
            protected=record["protected"],
            last_seen_at=record["last_seen_at"],
            last_seen_exact=record["last_seen_exact"],
            user_licensed=record["user_licensed"],
            as_of=as_of,
            window=window,
        )
    kind = None
    if subject_type == SubjectType.DEVICE and record["protected"] is not None:
        kind = record["device_kind"] or DEFAULT_KIND  # a device recorded by then
    return ReportRow(
        customer_id=record["customer_id"],
        subject_type=subject_type,
        subject_id=record["subject_id"],
        user_id=record["user_id"],
        device_kind=kind,
        licensed=licensed,
        status=str(status),
        basis=record["basis"],
        package=record["package"] if licensed else None,
        last_seen_at=record["last_seen_at"],
        devices_covered=None,
        last_seen_exact=record["last_seen_exact"],
    )

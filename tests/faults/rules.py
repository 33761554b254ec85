"""The licensing rules of CONTRACT.md and docs/licensing.md, written again for the suite (the
expected values must not come from the code under test):

- a device counts when protected and it signalled within the release window;
- `user` model: a user with a counting device holds a license (basis `user`); of a user's
  counting devices, the earliest first seen of each kind are covered (one business, two
  personal; ties by device id; a kind never reported is business), every further one is a
  device license `over_allowance`; a counting device without a user is `unassigned`;
- `device` model: every counting device is a device license `device_model`, users hold none.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

ALLOWANCE = {"business": 1, "personal": 2}
# (customer_id, subject_type, subject_id)
LicenseKey = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class DeviceState:
    customer_id: str
    device_id: str
    user_id: str | None
    kind: str | None
    protected: bool
    first_seen_at: datetime
    last_seen_at: datetime


def expected_licenses(
    devices: Iterable[DeviceState],
    license_models: Mapping[str, str],
    now: datetime,
    window: timedelta,
) -> dict[LicenseKey, str]:
    """Every license that should be active, with its basis."""
    licenses: dict[LicenseKey, str] = {}
    by_user: dict[tuple[str, str], list[DeviceState]] = defaultdict(list)
    for device in devices:
        if not (device.protected and now - device.last_seen_at < window):
            continue
        if license_models.get(device.customer_id, "user") == "device":
            licenses[(device.customer_id, "device", device.device_id)] = "device_model"
        elif device.user_id is None:
            licenses[(device.customer_id, "device", device.device_id)] = "unassigned"
        else:
            by_user[(device.customer_id, device.user_id)].append(device)
    for (customer_id, user_id), counting in by_user.items():
        licenses[(customer_id, "user", user_id)] = "user"
        for device in over_allowance(counting):
            licenses[(customer_id, "device", device.device_id)] = "over_allowance"
    return licenses


def over_allowance(counting: Iterable[DeviceState]) -> list[DeviceState]:
    covered: dict[str, int] = defaultdict(int)
    over = []
    for device in sorted(counting, key=lambda d: (d.first_seen_at, d.device_id)):
        kind = device.kind or "business"
        if covered[kind] < ALLOWANCE[kind]:
            covered[kind] += 1
        else:
            over.append(device)
    return over

"""Usage totals of a customer, as pure functions: the counts the usage report shows and the
daily `usage.snapshot` event carries.

Licenses consumed = licensed users + device licenses (unassigned, over allowance, and every
counting device under the device model). Each license counts once, under its package
(`none` when the customer held no live subscription when it was attributed).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

DEVICE_BASES = ("unassigned", "over_allowance", "device_model")
NO_PACKAGE = "none"


@dataclass(frozen=True, slots=True)
class LicenseCount:
    """`licenses` active licenses of one kind: subject type, basis and package."""

    subject_type: str
    basis: str
    package: str | None
    licenses: int


@dataclass(slots=True)
class PackageTotals:
    licensed_users: int = 0
    device_licenses: int = 0

    @property
    def total_licenses(self) -> int:
        return self.licensed_users + self.device_licenses


@dataclass(slots=True)
class UsageTotals:
    licensed_users: int = 0
    device_licenses: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DEVICE_BASES, 0))
    by_package: dict[str, PackageTotals] = field(default_factory=dict)

    @property
    def total_device_licenses(self) -> int:
        return sum(self.device_licenses.values())

    @property
    def total_licenses(self) -> int:
        return self.licensed_users + self.total_device_licenses

    def add(self, count: LicenseCount) -> None:
        package = self.by_package.setdefault(count.package or NO_PACKAGE, PackageTotals())
        if count.subject_type == "user":
            self.licensed_users += count.licenses
            package.licensed_users += count.licenses
        else:
            self.device_licenses[count.basis] += count.licenses
            package.device_licenses += count.licenses

    def as_dict(self) -> dict[str, Any]:
        return {
            "licensed_users": self.licensed_users,
            "device_licenses": self.total_device_licenses,
            "device_licenses_by_reason": dict(self.device_licenses),
            "total_licenses": self.total_licenses,
            "by_package": {
                name: {
                    "licensed_users": package.licensed_users,
                    "device_licenses": package.device_licenses,
                    "total_licenses": package.total_licenses,
                }
                for name, package in sorted(self.by_package.items())
            },
        }


def usage_totals(counts: Iterable[LicenseCount]) -> UsageTotals:
    totals = UsageTotals()
    for count in counts:
        if count.licenses:
            totals.add(count)
    return totals

"""Subscription rules, as pure functions: which package a user is attributed to, and which
event billing gets for a status change.

- A subscription in `in_trial` or `active` is live; a cancelled one attributes nothing.
- A user in one or more groups with a live subscription gets the highest of those groups'
  packages (core_plus above core); any other user, and every device license not covered by a
  user (unassigned, device model), gets the customer's default: the highest package among the
  live subscriptions attached to the customer itself. No live subscription: no package.
- An over-allowance device license has the package of its user.
- A trial turns active at `trial_ends_at` (the boundary itself included) unless the console
  changed the status earlier: a console change made before the trial's end wins, even when it
  reaches us after we converted the trial. The conversion itself is one statement
  (`trials_due` in sql/queries.sql, run by `worker/licensing/trials.py`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

PACKAGE_RANK = {"core": 1, "core_plus": 2}
LIVE_STATUSES = frozenset({"in_trial", "active"})


def highest_package(packages: Iterable[str]) -> str | None:
    return max(packages, key=PACKAGE_RANK.__getitem__, default=None)


@dataclass(frozen=True, slots=True)
class LiveSubscription:
    group_id: str | None
    package: str


def package_attribution(
    subscriptions: Iterable[LiveSubscription], memberships: Mapping[str, Iterable[str]]
) -> tuple[str | None, dict[str, str]]:
    """(the customer's default package, the package of each user a group gives one to).
    `memberships` maps each user to the groups they are a member of."""
    by_group: dict[str, list[str]] = defaultdict(list)
    customer_wide = []
    for subscription in subscriptions:
        if subscription.group_id is None:
            customer_wide.append(subscription.package)
        else:
            by_group[subscription.group_id].append(subscription.package)
    user_packages = {}
    for user_id, groups in memberships.items():
        package = highest_package(p for group in groups for p in by_group.get(group, ()))
        if package is not None:
            user_packages[user_id] = package
    return highest_package(customer_wide), user_packages


def status_event_type(previous: str | None, status: str) -> str | None:
    """The event billing gets for a status change, or None when nothing changed."""
    if previous == status and status != "in_trial":
        return None
    return {
        "active": "subscription.activated",
        "cancelled": "subscription.cancelled",
        "in_trial": "subscription.trial_changed",
    }[status]


@dataclass(frozen=True, slots=True)
class SeatUsage:
    """A live subscription with seats: how many it has, how many are used now, and whether
    billing was last told it is over."""

    customer_id: str
    subscription_id: str
    package: str
    group_id: str | None
    seats: int
    used: int
    was_over: bool

    @property
    def over(self) -> bool:
        return self.used > self.seats


def seat_crossings(usages: Iterable[SeatUsage]) -> list[SeatUsage]:
    """The subscriptions whose side of their seats changed since billing was last told:
    each gets `subscription.over_seats` or `subscription.within_seats` once."""
    return [usage for usage in usages if usage.over != usage.was_over]


def seat_event_type(usage: SeatUsage) -> str:
    return "subscription.over_seats" if usage.over else "subscription.within_seats"

"""Folds a batch of agent events into one change per device, per user and per customer.

Pure: no I/O, the receive time is passed in. The database applies the same "newest event
time wins" rules again when it merges these changes, so folding first only saves writes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from schemas.agent_events import Heartbeat, Install, Uninstall, UserProfile

AgentEventModel = Heartbeat | Install | Uninstall


@dataclass(slots=True)
class DeviceChange:
    customer_id: str
    device_id: str
    first_seen_at: datetime
    last_seen_at: datetime
    last_present_at: datetime | None = None
    last_installed_at: datetime | None = None
    last_uninstalled_at: datetime | None = None
    user_id: str | None = None
    user_reported_at: datetime | None = None
    device_kind: str | None = None
    kind_reported_at: datetime | None = None
    hostname: str | None = None
    os: str | None = None
    details_reported_at: datetime | None = None
    agent_version: str | None = None
    agent_version_reported_at: datetime | None = None
    # Latest signal that named no user: credited to whoever the device belongs to.
    unattributed_seen_at: datetime | None = None


@dataclass(slots=True)
class UserChange:
    customer_id: str
    user_id: str
    first_seen_at: datetime
    last_seen_at: datetime
    email: str | None = None
    display_name: str | None = None
    profile_reported_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class LifecycleRecord:
    customer_id: str
    event_id: str
    device_id: str
    event_type: str
    occurred_at: datetime


@dataclass(slots=True)
class BatchChanges:
    devices: dict[tuple[str, str], DeviceChange] = field(default_factory=dict)
    users: dict[tuple[str, str], UserChange] = field(default_factory=dict)
    lifecycle: dict[tuple[str, str], LifecycleRecord] = field(default_factory=dict)
    clamped_events: int = 0

    @property
    def customer_ids(self) -> list[str]:
        return sorted({customer_id for customer_id, _ in self.devices})

    def sorted_devices(self) -> list[DeviceChange]:
        return [self.devices[key] for key in sorted(self.devices)]

    def sorted_users(self) -> list[UserChange]:
        return [self.users[key] for key in sorted(self.users)]

    def sorted_lifecycle(self) -> list[LifecycleRecord]:
        return [self.lifecycle[key] for key in sorted(self.lifecycle)]

    def without_customers(self, customer_ids: set[str]) -> BatchChanges:
        """These changes less every change of the given customers (the batch-wide clamped
        count stays as it was)."""
        return BatchChanges(
            devices={k: v for k, v in self.devices.items() if k[0] not in customer_ids},
            users={k: v for k, v in self.users.items() if k[0] not in customer_ids},
            lifecycle={k: v for k, v in self.lifecycle.items() if k[0] not in customer_ids},
            clamped_events=self.clamped_events,
        )

    def split_by_customer(self, parts: int, min_devices_per_part: int = 1) -> list[BatchChanges]:
        """At most `parts` changes with disjoint customers and about as many devices each
        (largest customer first, into the lightest part), so that they can be written in
        concurrent transactions that never touch the same row: every row a signal writes
        or a license decision locks belongs to one customer. No more parts than
        `min_devices_per_part` allows. The batch-wide clamped count stays on this object.
        Empty when there is nothing to write."""
        devices_per_customer = Counter(customer_id for customer_id, _ in self.devices)
        parts = min(parts, len(devices_per_customer), len(self.devices) // min_devices_per_part)
        if parts <= 1:
            return [self] if self.devices or self.users or self.lifecycle else []
        split = [BatchChanges() for _ in range(parts)]
        loads = [0] * len(split)
        part_of: dict[str, BatchChanges] = {}
        by_size = sorted(devices_per_customer.items(), key=lambda item: (-item[1], item[0]))
        for customer_id, devices in by_size:
            lightest = loads.index(min(loads))
            loads[lightest] += devices
            part_of[customer_id] = split[lightest]
        # Every user and lifecycle change comes from an event that also changed a device
        # of the same customer, so every customer is in `part_of`.
        for key, device in self.devices.items():
            part_of[key[0]].devices[key] = device
        for user_key, user in self.users.items():
            part_of[user_key[0]].users[user_key] = user
        for event_key, record in self.lifecycle.items():
            part_of[event_key[0]].lifecycle[event_key] = record
        return split


def clamp_event_time(occurred_at: datetime, latest_allowed: datetime) -> datetime:
    """An agent clock in the future is not trusted past `latest_allowed`: the receive time
    plus a tolerance, computed once per batch by the caller."""
    return min(occurred_at, latest_allowed)


def coalesce(
    events: Iterable[AgentEventModel],
    received_at: datetime,
    future_tolerance: timedelta,
    into: BatchChanges | None = None,
) -> BatchChanges:
    """Folds `events` into new changes, or into `into` (the batch's earlier slices: the
    worker decodes a batch a slice at a time)."""
    # The hot loop of ingestion (several µs an event): it keeps per-event work to the
    # minimum, and the rules are the same for a device's first event and its later ones.
    changes = BatchChanges() if into is None else into
    devices, users = changes.devices, changes.users
    latest_allowed = received_at + future_tolerance
    for event in events:
        at = event.occurred_at
        if at > latest_allowed:
            changes.clamped_events += 1
            at = clamp_event_time(at, latest_allowed)
        if at.tzinfo is not UTC:
            # The standard library's UTC: asyncpg encodes it about twice as fast as
            # pydantic's tzinfo, and each event time is encoded several times per row.
            at = at.astimezone(UTC)
        key = (event.customer_id, event.device_id)
        device = devices.get(key)
        if device is None:
            device = devices[key] = DeviceChange(event.customer_id, event.device_id, at, at)
        elif at < device.first_seen_at:
            device.first_seen_at = at
        elif at > device.last_seen_at:
            device.last_seen_at = at
        if isinstance(event, Uninstall):
            _fold_uninstall(device, at)
            changes.lifecycle[(event.customer_id, event.event_id)] = _lifecycle(event, at)
            continue
        _fold_presence(device, event, at)
        if event.user_id is not None:
            _fold_user(users, event, event.user_id, at)
        if isinstance(event, Install):
            _fold_install(device, event, at)
            changes.lifecycle[(event.customer_id, event.event_id)] = _lifecycle(event, at)
    return changes


def _lifecycle(event: Install | Uninstall, at: datetime) -> LifecycleRecord:
    return LifecycleRecord(event.customer_id, event.event_id, event.device_id, event.type, at)


def _fold_uninstall(device: DeviceChange, at: datetime) -> None:
    device.last_uninstalled_at = _later(device.last_uninstalled_at, at)
    device.unattributed_seen_at = _later(device.unattributed_seen_at, at)


def _fold_presence(device: DeviceChange, event: Heartbeat | Install, at: datetime) -> None:
    """What a heartbeat or an install says about its device (not its user)."""
    device.last_present_at = _later(device.last_present_at, at)
    if event.agent_version is not None and _is_newer(at, device.agent_version_reported_at):
        device.agent_version, device.agent_version_reported_at = event.agent_version, at
    if event.names_user:
        if _is_newer(at, device.user_reported_at):
            device.user_id, device.user_reported_at = event.user_id, at
    else:
        device.unattributed_seen_at = _later(device.unattributed_seen_at, at)
    if event.device_kind is not None and _is_newer(at, device.kind_reported_at):
        device.device_kind, device.kind_reported_at = event.device_kind.value, at


def _fold_install(device: DeviceChange, event: Install, at: datetime) -> None:
    device.last_installed_at = _later(device.last_installed_at, at)
    if _is_newer(at, device.details_reported_at):
        device.hostname, device.os, device.details_reported_at = event.hostname, event.os, at


def _fold_user(
    users: dict[tuple[str, str], UserChange], event: Heartbeat | Install, user_id: str, at: datetime
) -> None:
    key = (event.customer_id, user_id)
    user = users.get(key)
    if user is None:
        user = users[key] = UserChange(event.customer_id, user_id, at, at)
    elif at < user.first_seen_at:
        user.first_seen_at = at
    elif at > user.last_seen_at:
        user.last_seen_at = at
    if isinstance(event, Install) and event.user is not None:
        _fold_profile(user, event.user, at)


def _fold_profile(user: UserChange, profile: UserProfile, at: datetime) -> None:
    if _is_newer(at, user.profile_reported_at):
        user.email, user.display_name = profile.email, profile.display_name
        user.profile_reported_at = at


def _is_newer(at: datetime, reported_at: datetime | None) -> bool:
    # Ties go to the later message, as in the database merge (`>=`).
    return reported_at is None or at >= reported_at


def _later(current: datetime | None, candidate: datetime) -> datetime:
    return candidate if current is None else max(current, candidate)

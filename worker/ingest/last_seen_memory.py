"""Last-seen precision: a heartbeat that would only move a device's last seen (and its
user's) forward by less than `LAST_SEEN_PRECISION_SECONDS` is not written.

Each replica remembers, per device it owns, what its last write of the device returned
(`LastSeenMemory`). A device's folded change that carries nothing else than such a move is
kept back here (`Remembered.pending`) instead of written; the device's next write carries
it along (`merge_earlier`), so an event processed later but older than a kept-back
heartbeat (a late uninstall, another user) is decided as if every heartbeat had been
written. Pure: no I/O; the caller owns the clock and the writes. docs/ingestion.md,
"Last-seen precision".
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from worker.ingest.coalesce import BatchChanges, DeviceChange, UserChange

DeviceKey = tuple[str, str]


@dataclass(slots=True)
class Remembered:
    """A device as this replica's last write of it left it, and what was kept back since
    (skipped heartbeats, which only ever said what is remembered here): the newest time
    each field was reported, written with the device's next change (`kept_back`)."""

    last_seen_at: datetime
    user_id: str | None
    device_kind: str | None
    agent_version: str | None
    protected: bool
    seen_since: datetime | None = None
    user_reported_since: datetime | None = None
    kind_reported_since: datetime | None = None
    version_reported_since: datetime | None = None
    unattributed_since: datetime | None = None

    def keep_back(self, change: DeviceChange) -> None:
        """Adds a skippable change (`is_skippable`) to what is kept back."""
        self.seen_since = _later(self.seen_since, change.last_seen_at)
        self.user_reported_since = _later(self.user_reported_since, change.user_reported_at)
        self.kind_reported_since = _later(self.kind_reported_since, change.kind_reported_at)
        self.version_reported_since = _later(
            self.version_reported_since, change.agent_version_reported_at
        )
        self.unattributed_since = _later(self.unattributed_since, change.unattributed_seen_at)

    def kept_back(self, customer_id: str, device_id: str) -> DeviceChange | None:
        """What was kept back, as a change (None if nothing), and forgets it."""
        seen = self.seen_since
        if seen is None:
            return None
        change = DeviceChange(customer_id, device_id, seen, seen, last_present_at=seen)
        if self.user_reported_since is not None:
            change.user_id, change.user_reported_at = self.user_id, self.user_reported_since
        if self.kind_reported_since is not None:
            change.device_kind = self.device_kind
            change.kind_reported_at = self.kind_reported_since
        if self.version_reported_since is not None:
            change.agent_version = self.agent_version
            change.agent_version_reported_at = self.version_reported_since
        change.unattributed_seen_at = self.unattributed_since
        self.seen_since = self.user_reported_since = self.kind_reported_since = None
        self.version_reported_since = self.unattributed_since = None
        return change


def is_skippable(change: DeviceChange, remembered: Remembered, precision: timedelta) -> bool:
    """True if writing `change` would only move the device's last seen (and its user's)
    forward by less than `precision`: heartbeats only (no install, uninstall or details), a
    device that is installed (a heartbeat after an uninstall is a reinstall), the same user,
    kind and agent version as stored (or none named), and every event at or after the
    stored last seen and before it plus the precision."""
    return (
        remembered.protected
        and change.last_installed_at is None
        and change.last_uninstalled_at is None
        and change.details_reported_at is None
        and (change.user_reported_at is None or change.user_id == remembered.user_id)
        and (change.device_kind is None or change.device_kind == remembered.device_kind)
        and (change.agent_version is None or change.agent_version == remembered.agent_version)
        and change.first_seen_at >= remembered.last_seen_at
        and change.last_seen_at < remembered.last_seen_at + precision
    )


def merge_earlier(change: DeviceChange, earlier: DeviceChange) -> None:
    """Folds into `change` the changes of messages processed before its own, with the fold's
    rules (worker/ingest/coalesce.py): maxima and minima; a reported value is the newest by
    event time, and a tie goes to the message processed later, `change`'s."""
    change.first_seen_at = min(change.first_seen_at, earlier.first_seen_at)
    change.last_seen_at = max(change.last_seen_at, earlier.last_seen_at)
    change.last_present_at = _later(change.last_present_at, earlier.last_present_at)
    change.last_installed_at = _later(change.last_installed_at, earlier.last_installed_at)
    change.last_uninstalled_at = _later(change.last_uninstalled_at, earlier.last_uninstalled_at)
    change.unattributed_seen_at = _later(change.unattributed_seen_at, earlier.unattributed_seen_at)
    if _wins(earlier.user_reported_at, change.user_reported_at):
        change.user_id, change.user_reported_at = earlier.user_id, earlier.user_reported_at
    if _wins(earlier.kind_reported_at, change.kind_reported_at):
        change.device_kind, change.kind_reported_at = earlier.device_kind, earlier.kind_reported_at
    if _wins(earlier.details_reported_at, change.details_reported_at):
        change.hostname, change.os = earlier.hostname, earlier.os
        change.details_reported_at = earlier.details_reported_at
    if _wins(earlier.agent_version_reported_at, change.agent_version_reported_at):
        change.agent_version = earlier.agent_version
        change.agent_version_reported_at = earlier.agent_version_reported_at


@dataclass(slots=True)
class LastSeenMemory:
    """What this replica last wrote for each device it owns, for at most `capacity` devices.
    When full, a further device is not remembered (its heartbeats are written): nothing
    remembered is ever evicted, so no kept-back change is lost while the partitions are
    owned. `forget_all` empties it when partitions are revoked; a write that began before
    (`generation`) no longer fills it."""

    capacity: int
    generation: int = 0
    _devices: dict[DeviceKey, Remembered] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._devices)

    def get(self, key: DeviceKey) -> Remembered | None:
        return self._devices.get(key)

    def take_kept_back(self) -> BatchChanges:
        """Every device's kept-back changes, as changes to write, and forgets them: a replica
        that loses its devices writes them first."""
        changes = BatchChanges()
        for key, remembered in self._devices.items():
            kept_back = remembered.kept_back(*key)
            if kept_back is not None:
                changes.devices[key] = kept_back
        _add_kept_back_users(changes, changes.devices.values())
        return changes

    def forget(self, keys: Iterable[DeviceKey]) -> None:
        for key in keys:
            self._devices.pop(key, None)

    def forget_all(self) -> None:
        self._devices.clear()
        self.generation += 1

    def remember(self, key: DeviceKey, written: Remembered, generation: int) -> None:
        """Records what a write returned for a device (its `pending` is ignored), if the
        write began in this generation; keeps the device's kept-back changes (added since
        that write began)."""
        if generation != self.generation:
            return
        customer_id, device_id = key
        key = (sys.intern(customer_id), device_id)  # one string per customer
        # Kinds and versions are few across a fleet: one string each, shared.
        kind = None if written.device_kind is None else sys.intern(written.device_kind)
        version = None if written.agent_version is None else sys.intern(written.agent_version)
        remembered = self._devices.get(key)
        if remembered is None:
            if len(self._devices) < self.capacity:
                self._devices[key] = Remembered(
                    written.last_seen_at, written.user_id, kind, version, written.protected
                )
            return
        remembered.last_seen_at, remembered.user_id = written.last_seen_at, written.user_id
        remembered.device_kind, remembered.agent_version = kind, version
        remembered.protected = written.protected
        # A write returned, not a heartbeat kept back: what was kept back stays (it came
        # after the write began).


def keep_back_unchanged(
    changes: BatchChanges, memory: LastSeenMemory, precision: timedelta
) -> set[DeviceKey]:
    """Takes out of `changes` every device change that `is_skippable`, keeping it in the
    memory, and the user changes that then only move a remembered user's last seen by less
    than `precision`; merges every written device's kept-back changes into its change.
    A user change that remains is written with its customer's devices, so a customer left
    with one keeps its devices written. Returns the keys of the devices taken out."""
    candidates = {
        key: remembered
        for key, change in changes.devices.items()
        if (remembered := memory.get(key)) is not None
        and is_skippable(change, remembered, precision)
    }
    dropped = _user_changes_within_precision(changes, candidates.items(), precision)
    written_customers = {customer for customer, _ in changes.devices.keys() - candidates.keys()}
    needing_devices = {
        customer
        for customer, user in changes.users.keys() - dropped
        if customer not in written_customers
    }
    if needing_devices:
        candidates = {k: r for k, r in candidates.items() if k[0] not in needing_devices}
        dropped = _user_changes_within_precision(changes, candidates.items(), precision)
    merged: list[DeviceChange] = []
    for key, change in changes.devices.items():
        remembered = memory.get(key)
        if remembered is None:
            continue
        if key in candidates:
            remembered.keep_back(change)
            continue
        kept_back = remembered.kept_back(*key)
        if kept_back is not None:
            merge_earlier(change, kept_back)
            merged.append(kept_back)
    for key in candidates:
        del changes.devices[key]
    for user_key in dropped:
        del changes.users[user_key]
    _add_kept_back_users(changes, merged)
    return set(candidates)


def _user_changes_within_precision(
    changes: BatchChanges, skipped: Iterable[tuple[DeviceKey, Remembered]], precision: timedelta
) -> set[tuple[str, str]]:
    """The user changes that only move the last seen of the remembered user of a skipped
    device by less than the precision: that user was written with a last seen at least the
    device's."""
    dropped = set()
    for (customer_id, _), remembered in skipped:
        if remembered.user_id is None:
            continue
        user_key = (customer_id, remembered.user_id)
        user = changes.users.get(user_key)
        if (
            user is not None
            and user.profile_reported_at is None
            and user.first_seen_at >= remembered.last_seen_at
            and user.last_seen_at < remembered.last_seen_at + precision
        ):
            dropped.add(user_key)
    return dropped


def _add_kept_back_users(changes: BatchChanges, kept_back: Iterable[DeviceChange]) -> None:
    """The user a kept-back heartbeat named (the remembered one) is seen then too."""
    for pending in kept_back:
        at = pending.user_reported_at
        if pending.user_id is None or at is None:
            continue
        key = (pending.customer_id, pending.user_id)
        user = changes.users.get(key)
        if user is None:
            changes.users[key] = UserChange(pending.customer_id, pending.user_id, at, at)
        else:
            user.first_seen_at = min(user.first_seen_at, at)
            user.last_seen_at = max(user.last_seen_at, at)


def _wins(earlier: datetime | None, later: datetime | None) -> bool:
    return earlier is not None and (later is None or earlier > later)


def _later(current: datetime | None, candidate: datetime | None) -> datetime | None:
    if current is None:
        return candidate
    return current if candidate is None else max(current, candidate)


def co_partitioning_problem(
    topics: tuple[str, str],
    partition_counts: tuple[int | None, int | None],
    assigned: Iterable[tuple[str, int]],
) -> str | None:
    """Why heartbeats may not be skipped with this assignment, or None if they may: the
    replica that writes a device's heartbeats must see its installs and uninstalls (a
    heartbeat after an uninstall is a reinstall). That holds when both agent topics have the
    same number of partitions (producers key both by the device, so a device is on the same
    partition number in each) and this replica has partition p of one exactly when it has
    partition p of the other. Reasons name no input value."""
    heartbeat_count, lifecycle_count = partition_counts
    if heartbeat_count is None or lifecycle_count is None:
        return "partition_count_unknown"
    if heartbeat_count != lifecycle_count:
        return "partition_counts_differ"
    heartbeat_topic, lifecycle_topic = topics
    by_topic: dict[str, set[int]] = {heartbeat_topic: set(), lifecycle_topic: set()}
    for topic, partition in assigned:
        if topic in by_topic:
            by_topic[topic].add(partition)
    if by_topic[heartbeat_topic] != by_topic[lifecycle_topic]:
        return "partitions_not_assigned_together"
    return None

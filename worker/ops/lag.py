"""Consumer lag and stuck partitions, from the broker's end offsets and what was stored. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from worker.licensing.sweep_rules import PartitionKey, StoredProgress


@dataclass(frozen=True, slots=True)
class PartitionLag:
    messages: int
    seconds: float


def partition_lag(end_offset: int, stored: StoredProgress | None, now: datetime) -> PartitionLag:
    """Offsets not yet stored, and how old the newest stored message is while any wait
    (0 s when caught up: a quiet partition is not a late one)."""
    if stored is None:
        return PartitionLag(end_offset, 0.0 if end_offset == 0 else float("inf"))
    behind = max(end_offset - stored.next_offset, 0)
    seconds = max((now - stored.last_message_at).total_seconds(), 0.0) if behind else 0.0
    return PartitionLag(behind, seconds)


@dataclass(frozen=True, slots=True)
class Watch:
    next_offset: int
    since: float  # monotonic time next_offset last changed (or first seen)


def watch_partitions(
    previous: Mapping[PartitionKey, Watch],
    stored_offsets: Mapping[PartitionKey, int],
    now: float,
) -> dict[PartitionKey, Watch]:
    watched = {}
    for partition, offset in stored_offsets.items():
        before = previous.get(partition)
        unchanged = before is not None and before.next_offset == offset
        watched[partition] = before if unchanged and before else Watch(offset, now)
    return watched


def stuck_partitions(
    watched: Mapping[PartitionKey, Watch],
    lag: Mapping[PartitionKey, PartitionLag],
    now: float,
    bound_seconds: float,
) -> list[PartitionKey]:
    """Assigned partitions with messages waiting whose stored offset has not moved for
    `bound_seconds`."""
    return sorted(
        partition
        for partition, watch in watched.items()
        if lag.get(partition, PartitionLag(0, 0)).messages > 0
        and now - watch.since >= bound_seconds
    )

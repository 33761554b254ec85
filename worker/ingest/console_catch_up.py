"""Whether the console's consumer group has applied every console message (issue #15, the
fault run): with UNKNOWN_CUSTOMERS=refuse, the signals of a customer not in the database go
to the DLQ, but a customer the console created may not be applied yet (the console group
rebalancing, a replica restarting). The ingestion loop waits while the group is behind
(worker/ingest/loop.py, CONSOLE_CATCH_UP_WAIT_SECONDS). Pure: the offsets are read by
worker/kafka/clients.py (PartitionEnds.group_behind)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

Partition = TypeVar("Partition")


def messages_behind(
    ends: Mapping[Partition, int],
    beginnings: Mapping[Partition, int],
    committed: Mapping[Partition, int],
) -> int:
    """Messages of these partitions the group has not committed: per partition, its end
    offset less the group's committed offset, or less its beginning where the group never
    committed (a negative offset: none). A partition whose end is unknown counts for
    nothing."""
    behind = 0
    for partition, end in ends.items():
        offset = committed.get(partition, -1)
        start = offset if offset >= 0 else beginnings.get(partition, 0)
        behind += max(0, end - start)
    return behind

"""Partition maintenance (migration 0015; docs/scaling.md, "Partitioning and retention"):
each sweeper pass creates the monthly partitions of the partitioned tables ahead of its clock
and drops those wholly past their retention, through the SECURITY DEFINER function
`maintain_partitions` (the worker has no DDL). A refusal (no EXECUTE: `create-roles` not run
again after `migrate`; a lock not had within 5 s) is logged and tried again at the next pass;
the sweep goes on. An outage is raised, as any other."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg
import structlog

from worker.db.errors import is_no_answer
from worker.db.repository import Repository
from worker.ops.logs import error_fields
from worker.settings import Settings

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class PartitionChanges:
    table: str
    created: int
    dropped: int
    moved: int  # rows moved from the default partition into a new month's partition
    deleted: int  # rows of the default partition past the retention
    retained_from: datetime | None  # where the kept rows begin; None: nothing removed yet

    @property
    def changed(self) -> bool:
        return bool(self.created or self.dropped or self.moved or self.deleted)


def retention_months(settings: Settings) -> dict[str, int]:
    """Each partitioned table and its retention in months."""
    return {
        "license_history": settings.license_history_retention_months,
        "device_lifecycle_events": settings.lifecycle_events_retention_months,
        "usage_snapshots": settings.usage_snapshots_retention_months,
    }


async def maintain_partitions(
    repository: Repository, settings: Settings, now: datetime
) -> list[PartitionChanges]:
    """Creates partitions ahead of `now` and drops those past the retention, one table per
    transaction; returns what changed in each."""
    changes = []
    for table, months in retention_months(settings).items():
        [row] = await repository.fetch(
            "maintain_partitions", table, now, months, settings.partition_months_ahead
        )
        changes.append(
            PartitionChanges(
                table,
                int(row["created"]),
                int(row["dropped"]),
                int(row["moved"]),
                int(row["deleted"]),
                row["retained_from"],
            )
        )
    return changes


async def maintain_partitions_logged(
    repository: Repository, settings: Settings, now: datetime
) -> None:
    """As `maintain_partitions`, with a log line for each table that changed; a refusal is
    logged (`sweep.partitions_refused`) instead of failing the sweep."""
    try:
        changes = await maintain_partitions(repository, settings, now)
    except asyncpg.PostgresError as error:
        if is_no_answer(error):
            raise
        log.error("sweep.partitions_refused", **error_fields(error))
        return
    for change in changes:
        if change.changed:
            log.info(
                "sweep.partitions_maintained",
                table=change.table,
                created=change.created,
                dropped=change.dropped,
                moved=change.moved,
                deleted=change.deleted,
                retained_from=change.retained_from.isoformat() if change.retained_from else None,
            )

"""The monitor calls partitions stuck when their offset does not move while messages wait,
and recreates the consumer; not while ingestion holds them on purpose (a batch waiting for
the console's consumer group: worker/ingest/loop.py)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from worker.db.wait import DatabaseAnswers
from worker.ops import metrics
from worker.ops.health import Liveness, Readiness
from worker.ops.monitor import Monitor
from worker.settings import Settings

PARTITION = ("agent.heartbeat", 0)
SETTINGS = Settings(
    stuck_partition_seconds=0.001,
    pseudonym_key=bytes(range(32)).hex(),
    pseudonym_key_file=None,
)


class StuckProgress:
    """Postgres answers; the partition's stored offset stays at 3 of 10."""

    def __init__(self) -> None:
        async def probe() -> bool:
            return True

        self.answers = DatabaseAnswers(probe)

    async def ping(self) -> None:
        return None

    async def fetch(self, name: str, *arguments: Any) -> list[Any]:
        assert name == "ingestion_progress"
        return [
            {
                "topic": PARTITION[0],
                "partition": PARTITION[1],
                "next_offset": 3,
                "last_message_at": datetime(2026, 12, 1, tzinfo=UTC),
            }
        ]


def monitor(held: bool, stuck: list[Any]) -> Monitor:
    async def partition_ends() -> dict[tuple[str, int], int]:
        return {PARTITION: 10}

    return Monitor(
        settings=SETTINGS,
        repository=StuckProgress(),  # type: ignore[arg-type]
        partition_ends=partition_ends,
        assignment=lambda: {PARTITION},
        liveness=Liveness(),
        readiness=Readiness(),
        on_stuck=stuck.append,
        held=lambda: held,
    )


@pytest.mark.parametrize(("held", "recreated"), [(False, True), (True, False)])
async def test_held_partitions_are_not_stuck(held: bool, recreated: bool) -> None:
    stuck: list[Any] = []
    checked = monitor(held, stuck)
    for _ in range(2):  # the first starts the watch, the second finds it stuck
        await checked.check_once()
        await asyncio.sleep(0.01)  # past the 1 ms bound
    assert bool(stuck) == recreated
    assert metrics.STUCK_PARTITIONS._value.get() == (1 if recreated else 0)

"""No background task dies of a Postgres or Kafka outage: the monitor, the sweeper, and the
worker's supervision of every background task. (The real restarts are in
tests/integration/test_postgres_outages.py.)"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError

from worker.clock import FixedClock
from worker.db.wait import DatabaseAnswers
from worker.licensing.sweeper import Sweeper
from worker.ops.health import Liveness, Readiness
from worker.ops.monitor import Monitor
from worker.service import Worker, is_transient_kafka_error
from worker.settings import Settings

FAST = Settings(
    retry_initial_seconds=0.01,
    retry_max_seconds=0.01,
    sweep_interval_seconds=0.01,
    pseudonym_key=bytes(range(32)).hex(),  # a Worker refuses to start without one
    pseudonym_key_file=None,
)


def answering(answer: bool = True) -> DatabaseAnswers:
    async def probe() -> bool:
        return answer

    return DatabaseAnswers(probe)


class FailingLagQuery:
    """Answers the monitor's probe, then fails its lag query: Postgres went away between."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.answers = answering()

    async def ping(self) -> None:
        return None

    async def fetch(self, name: str, *arguments: Any) -> list[Any]:
        raise self.error


def monitor_on(repository: Any, readiness: Readiness) -> Monitor:
    async def partition_ends() -> dict[tuple[str, int], int]:
        return {("agent.heartbeat", 0): 10}

    return Monitor(
        settings=FAST,
        repository=repository,
        partition_ends=partition_ends,
        assignment=lambda: {("agent.heartbeat", 0)},
        liveness=Liveness(),
        readiness=readiness,
        on_stuck=lambda _: None,
    )


async def test_the_monitor_survives_postgres_leaving_between_probe_and_lag_query() -> None:
    readiness = Readiness()
    monitor = monitor_on(FailingLagQuery(ConnectionRefusedError(111, "refused")), readiness)
    await monitor.check_once()
    assert readiness.problems() == ["postgres unreachable"]


async def test_the_monitor_still_ends_on_a_bug() -> None:
    monitor = monitor_on(FailingLagQuery(KeyError("next_offset")), Readiness())
    with pytest.raises(KeyError):
        await monitor.check_once()


class LockUnreachable:
    """A repository whose sweeper lease cannot be asked for `failures` times (Postgres down),
    then is held by another replica."""

    def __init__(self, failures: int, stopping: asyncio.Event) -> None:
        self.failures = failures
        self.asked = 0
        self.stopping = stopping
        self.up = False

        async def probe() -> bool:
            return self.up

        self.answers = DatabaseAnswers(probe)

    async def take_lease(self, lease: Any) -> bool:
        self.asked += 1
        if self.asked <= self.failures:
            raise ConnectionRefusedError(111, "refused")
        if self.asked > self.failures + 1:
            self.stopping.set()
        return False


async def test_the_sweeper_waits_for_postgres_instead_of_dying() -> None:
    stopping = asyncio.Event()
    repository = LockUnreachable(failures=3, stopping=stopping)

    async def database_back() -> None:
        await asyncio.sleep(0.2)
        repository.up = True

    back = asyncio.create_task(database_back())
    sweeper = Sweeper(
        FAST,
        repository,  # type: ignore[arg-type]
        end_offsets=None,
        clock=FixedClock(datetime.now(UTC)),
        stopping=stopping,
    )
    await asyncio.wait_for(sweeper.run_forever(), 10)
    await back
    assert repository.asked == 5, "three refusals, then two turns as a follower"


async def run_supervised(worker: Worker, name: str, outcomes: list[Exception | None]) -> int:
    """Runs a task through `_run_through_outages` whose runs end with `outcomes` in turn."""
    runs = 0

    async def run() -> None:
        nonlocal runs
        outcome = outcomes[runs]
        runs += 1
        if outcome is not None:
            raise outcome

    database = type("Database", (), {"answers": answering()})()
    await asyncio.wait_for(worker._run_through_outages(name, run, database), 10)
    return runs


async def test_a_background_task_ended_by_an_outage_runs_again() -> None:
    outages: list[Exception | None] = [
        ConnectionRefusedError(111, "refused"),
        KafkaConnectionError("no broker"),
        None,
    ]
    assert await run_supervised(Worker(FAST), "relay", outages) == 3


async def test_a_background_task_ended_by_a_bug_ends_the_worker() -> None:
    with pytest.raises(ZeroDivisionError):
        await run_supervised(Worker(FAST), "relay", [ZeroDivisionError()])


async def test_a_task_ended_by_an_outage_while_stopping_is_not_run_again() -> None:
    worker = Worker(FAST)
    runs = 0

    async def run() -> None:
        nonlocal runs
        runs += 1
        worker.stop()
        raise ConnectionRefusedError(111, "refused")

    database = type("Database", (), {"answers": answering()})()
    await asyncio.wait_for(worker._run_through_outages("monitor", run, database), 10)
    assert runs == 1


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (KafkaConnectionError("no broker"), True),
        (ConnectionRefusedError(), False),  # Postgres's, classified by the repository
        (ValueError(), False),
    ],
    ids=lambda value: type(value).__name__,
)
def test_kafka_outages(error: Exception, transient: bool) -> None:
    assert is_transient_kafka_error(error) is transient

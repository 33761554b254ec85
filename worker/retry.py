"""Retrying: one loop (`retry`) and one backoff (`Backoff`) for every caller that waits out
an outage (the worker's start-up and its background tasks, the Kafka clients' start, the
consumer session's writes, DLQ and commits, the outbox relay).

`retry` only runs the operation again; how long to wait after a failure is the caller's
`wait`: Postgres outages wait on the probe (worker/db/wait.py), Kafka outages back off, the
consumer session backs off while polling paused. A permanent error is not retried, and a
worker asked to stop (`stopping`) is not kept waiting.

Our own helper rather than tenacity: tenacity's waits are computed delays, while ours is
"until Postgres answers" (a probe), stopping must interrupt it, and tenacity has no equal
jitter (`wait_random_exponential` is full jitter); wrapping it would be longer than this
module, and it would be one more dependency.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class Stopped(Exception):
    """The worker was asked to stop while an operation waited to be retried: it was given up
    (for a batch: uncommitted, so it is read again after the restart)."""


async def retry(
    operation: Callable[[], Awaitable[T]],
    *,
    retriable: Callable[[Exception], bool],
    wait: Callable[[Exception], Awaitable[None]],
    stopping: asyncio.Event | None = None,
) -> T:
    """Runs `operation` until it succeeds. After an error that is not `retriable`, the error
    is raised; after one that is, `wait(error)` returns when the next attempt is worth it (or
    raises to give up). If `stopping` is set before or after that wait, Stopped is raised."""
    while True:
        try:
            return await operation()
        except Exception as error:
            if not retriable(error):
                raise
            if stopping is not None and stopping.is_set():
                raise Stopped from error
            await wait(error)
            if stopping is not None and stopping.is_set():
                raise Stopped from error


def always(error: Exception) -> bool:
    """For a caller that retries every error (it reports the permanent ones in its `wait`)."""
    return True


class Backoff:
    """Capped exponential backoff with "equal jitter": each delay is drawn uniformly between
    half its ceiling and the ceiling (`initial * 2**attempts`, capped), so delays never shrink
    before the cap and replicas that failed together do not retry together. (Not "full
    jitter", which would draw from 0 to the ceiling.)

    For Kafka, and for Postgres while it answers but an operation still fails: waiting for
    Postgres to come back after an outage is worker/db/wait.py's probe, not this backoff."""

    def __init__(self, initial_seconds: float, max_seconds: float) -> None:
        self._initial = initial_seconds
        self._max = max_seconds
        self.attempts = 0

    def next_delay(self) -> float:
        # The exponent stops growing at the cap: a days-long outage must not overflow.
        doublings = min(self.attempts, 64)
        ceiling = min(self._max, self._initial * 2.0**doublings)
        self.attempts += 1
        # Equal jitter: half the ceiling, plus a uniform draw over the other half.
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempts = 0

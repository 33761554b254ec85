"""Capped exponential backoff with "equal jitter": each delay is drawn uniformly between half
its ceiling and the ceiling (`initial * 2**attempts`, capped), so delays never shrink before the
cap and replicas that failed together do not retry together. (Not "full jitter", which would
draw from 0 to the ceiling.)

For Kafka, and for Postgres while it answers but an operation still fails: waiting for
Postgres to come back after an outage is worker/db/wait.py's probe, not this backoff."""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, initial_seconds: float, max_seconds: float) -> None:
        self._initial = initial_seconds
        self._max = max_seconds
        self.attempts = 0

    def next_delay(self) -> float:
        # The exponent stops growing at the cap: a days-long outage must not overflow.
        doublings = min(self.attempts, 64)
        ceiling = min(self._max, self._initial * 2.0**doublings)
        self.attempts += 1
        # Equal jitter: replicas that failed together do not retry together.
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempts = 0

"""Capped exponential backoff with full jitter, for waiting out Kafka and Postgres outages."""

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
        # Full jitter: replicas that failed together do not retry together.
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempts = 0

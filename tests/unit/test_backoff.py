"""`worker.retry.Backoff`: capped exponential backoff, equal jitter (half to all of a ceiling)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker import retry as backoff_module
from worker.retry import Backoff


def ceilings(initial: float, maximum: float, count: int) -> list[float]:
    return [min(maximum, initial * 2**attempt) for attempt in range(count)]


@pytest.fixture
def upper_bound(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, float]]:
    """Makes the jitter pick its upper bound, and records every (low, high) it was given."""
    calls: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        calls.append((low, high))
        return high

    monkeypatch.setattr(backoff_module.random, "uniform", uniform)
    return calls


@pytest.mark.parametrize(
    ("initial", "maximum", "expected"),
    [
        (0.2, 30.0, [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0, 30.0]),
        (1.0, 4.0, [1.0, 2.0, 4.0, 4.0, 4.0]),
        (1.0, 3.0, [1.0, 2.0, 3.0, 3.0]),
        (5.0, 5.0, [5.0, 5.0, 5.0]),
        (10.0, 2.0, [2.0, 2.0]),
    ],
    ids=["defaults", "power-of-two-cap", "uneven-cap", "cap-is-initial", "cap-below-initial"],
)
def test_ceiling_doubles_up_to_the_cap(
    upper_bound: list[tuple[float, float]], initial: float, maximum: float, expected: list[float]
) -> None:
    backoff = Backoff(initial, maximum)
    delays = [backoff.next_delay() for _ in expected]
    assert delays == pytest.approx(expected)
    lows, highs = zip(*upper_bound, strict=True)
    assert highs == pytest.approx(expected)
    assert lows == pytest.approx([ceiling / 2 for ceiling in expected])


def test_attempts_count_and_reset(upper_bound: list[tuple[float, float]]) -> None:
    backoff = Backoff(0.5, 60.0)
    assert backoff.attempts == 0
    for _ in range(4):
        backoff.next_delay()
    assert backoff.attempts == 4
    backoff.reset()
    assert backoff.attempts == 0
    assert backoff.next_delay() == 0.5


def test_reset_during_the_cap_starts_over() -> None:
    backoff = Backoff(0.2, 30.0)
    for _ in range(20):
        backoff.next_delay()
    backoff.reset()
    assert 0.1 <= backoff.next_delay() <= 0.2


def test_real_jitter_stays_within_half_to_full_ceiling() -> None:
    backoff = Backoff(0.2, 30.0)
    for ceiling in ceilings(0.2, 30.0, 40):
        delay = backoff.next_delay()
        assert ceiling / 2 <= delay <= ceiling


def test_jitter_varies() -> None:
    delays = {Backoff(1.0, 1.0).next_delay() for _ in range(50)}
    assert len(delays) > 1


@settings(max_examples=200, deadline=None)
@given(
    initial=st.floats(min_value=0.001, max_value=10.0),
    extra=st.floats(min_value=0.0, max_value=600.0),
    count=st.integers(min_value=1, max_value=60),
)
def test_delays_grow_within_bounds_until_capped(initial: float, extra: float, count: int) -> None:
    maximum = initial + extra
    backoff = Backoff(initial, maximum)
    delays = [backoff.next_delay() for _ in range(count)]
    for delay, ceiling in zip(delays, ceilings(initial, maximum, count), strict=True):
        assert ceiling / 2 <= delay <= ceiling <= maximum
    # Before the cap each range starts where the previous one ended, so delays never shrink.
    uncapped = [
        delay
        for delay, ceiling in zip(delays, ceilings(initial, maximum, count), strict=True)
        if ceiling < maximum
    ]
    assert uncapped == sorted(uncapped)


def test_a_long_outage_keeps_returning_capped_delays() -> None:
    backoff = Backoff(0.2, 30.0)
    delays = [backoff.next_delay() for _ in range(1100)]
    assert all(15.0 <= delay <= 30.0 for delay in delays[8:])

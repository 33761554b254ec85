"""The benchmark's CPU ceiling (a4): cores divided by the CPU one event costs in both stages."""

from __future__ import annotations

import pytest

from scripts.bench.stages import RateResult, cpu_ceiling


def _rate(events_per_second: float, **cores: float) -> RateResult:
    return RateResult(
        messages=1_000,
        events_per_second=events_per_second,
        events_per_second_with_startup=events_per_second,
        startup_seconds=0.0,
        measured_seconds=1_000 / events_per_second,
        extra={"cores_used": {"bench": 0.0, "machine_cores": 2, **cores}},
    )


def test_the_ceiling_adds_what_each_stage_costs_per_event_on_every_process() -> None:
    # Decoding: 1 core of Python + 0.1 of the broker at 110,000 ev/s = 10 µs an event.
    decode = _rate(110_000, bench=1.0, kafka=0.1, postgres=0.3)  # Postgres idles meanwhile
    # Writing: 0.5 core of Python + 1.5 of Postgres at 100,000 ev/s = 20 µs an event.
    write = _rate(100_000, bench=0.5, kafka=0.2, postgres=1.5)  # the broker is not used
    assert cpu_ceiling(decode, write) == pytest.approx(2 / 30e-6)


def test_a_slower_write_lowers_the_ceiling_by_its_extra_cost_per_event() -> None:
    decode = _rate(50_000, bench=1.0)  # 20 µs an event
    assert cpu_ceiling(decode, _rate(50_000, bench=1.0)) == pytest.approx(50_000)  # 20 + 20
    assert cpu_ceiling(decode, _rate(25_000, bench=1.0)) == pytest.approx(2 / 60e-6)  # 20 + 40

"""The benchmark's pure arithmetic: percentiles, medians, verdicts, the worker's batch figures
between two scrapes, when an offset was first seen committed, and the rows of the table."""

from __future__ import annotations

import math

import pytest

from scripts.bench.latency import OffsetTimeline, batch_statistics, percentile
from scripts.bench.report import fmt, measure_row, median, table_rows, verdict


@pytest.mark.parametrize(
    ("q", "expected"), [(0, 10.0), (50, 25.0), (90, 37.0), (99, 39.7), (100, 40.0)]
)
def test_a_percentile_interpolates_between_the_ordered_values(q: float, expected: float) -> None:
    assert percentile([40.0, 10.0, 30.0, 20.0], q) == pytest.approx(expected)


def test_no_values_have_no_percentile_median_or_printed_figure() -> None:
    assert math.isnan(percentile([], 50))
    assert math.isnan(median([]))
    assert fmt(median([])) == "-"
    assert verdict(float("nan"), 250, False) == ""


@pytest.mark.parametrize(
    ("value", "target", "higher_is_better", "expected"),
    [(20_000, 20_000, True, "PASS"), (19_999, 20_000, True, "FAIL"), (251, 250, False, "FAIL")],
)
def test_a_verdict_compares_with_the_target_in_its_direction(
    value: float, target: float, higher_is_better: bool, expected: str
) -> None:
    assert verdict(value, target, higher_is_better) == expected


def test_batch_figures_are_what_the_worker_did_between_the_two_scrapes() -> None:
    before = {"batches": 10.0, "messages": 1_000.0, "write_seconds": 1.0}
    after = {"batches": 30.0, "messages": 3_000.0, "write_seconds": 1.5}
    assert batch_statistics(before, after) == {
        "worker_batches": 20.0,
        "mean_batch": 100.0,
        "mean_write_ms": 25.0,
    }
    assert batch_statistics({}, after)["mean_batch"] is None  # metrics not scraped


def test_an_offset_is_covered_when_the_committed_offset_first_passes_it() -> None:
    timeline = OffsetTimeline()
    partition = ("heartbeats", 0)
    timeline.observe(1.0, {partition: 5})
    timeline.observe(2.0, {partition: 5})  # no advance: the first time stands
    timeline.observe(3.0, {partition: 9})
    assert timeline.time_of(partition, 4) == 1.0
    assert timeline.time_of(partition, 5) == 3.0
    assert timeline.time_of(partition, 9) is None  # not committed yet
    assert timeline.total() == 9


def test_a_row_shows_the_median_and_every_run() -> None:
    assert measure_row("x", [3.0, 1.0, 2.0], 1, ">= 2", "PASS") == (
        "x",
        ">= 2",
        "2.0",
        "3.0, 1.0, 2.0",
        "PASS",
    )


def test_the_table_has_the_drain_verdict_and_the_largest_peak_rss() -> None:
    run = {
        "messages": 8_020,
        "read": {"events_per_second": 300_000.0},
        "drain": {
            "events_per_second": 21_000.0,
            "events_per_second_with_startup": 9_000.0,
            "extra": {"second_half_events_per_second": None, "license_events_per_device": 0.41},
        },
        "ratio": 0.07,
    }
    rows = table_rows({"shapes": {"live": {"runs": [run]}}, "peak_rss_mb_by_run": [80.0, 300.0]})
    assert [row[0] for row in rows] == [
        "live (8,020 msgs): (a) read limit, ev/s",  # no stage rows: run with --skip-stages
        "live: (b) worker drain, ev/s",
        "live: (b) second half of the messages only, ev/s",
        "live: (b') drain incl. start-up, ev/s",
        "live: (c) drain / read limit",
        "live: license events per device",
        "(e) worker peak RSS, MB (max over all runs)",
    ]
    assert rows[5][1:] == ("<= 1.05", "0.41", "0.41", "PASS")
    assert rows[1][1:] == (">= 20,000", "21,000", "21,000", "PASS")
    assert rows[2][2] == "-"  # the second half was not measured
    assert rows[-1][1:] == ("<= 256", "300.0", "80, 300", "FAIL")

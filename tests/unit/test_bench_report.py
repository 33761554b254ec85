"""The benchmark's pure arithmetic: percentiles, medians, verdicts, the worker's batch figures
between two scrapes, when an offset was first seen committed, and the rows of the table."""

from __future__ import annotations

import math
from typing import Any

import pytest

from scripts.bench.latency import OffsetTimeline, batch_statistics, percentile
from scripts.bench.report import (
    TARGETS,
    alternating_order,
    cpu_us_per_event,
    cpu_us_per_event_after_first_round,
    fmt,
    measure_row,
    median,
    shape_medians,
    shape_verdicts,
    table_rows,
    verdict,
)


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


def run_result(
    rate: float, messages: int, first: int, seconds: float, cores: dict[str, float]
) -> dict[str, Any]:
    """A drain's RateResult as the JSON holds it."""
    return {
        "messages": messages,
        "events_per_second": rate,
        "events_per_second_with_startup": rate / 2,
        "measured_seconds": seconds,
        "extra": {
            "first_progress_messages": first,
            "second_half_events_per_second": None,
            "license_events_per_device": 0.41,
            "cores_used": cores,
        },
    }


def shape_run(drain: float, peer: float, read: float = 300_000.0) -> dict[str, Any]:
    return {
        "messages": 11_000,
        "read": {"events_per_second": read},
        "drain": run_result(drain, 11_000, 1_000, 2.0, {"worker": 0.5, "postgres": 0.25}),
        "peer": run_result(peer, 11_000, 1_000, 1.0, {"worker": 0.2, "postgres": 0.1}),
        "ratio": drain / read,
        "ratio_to_peer": drain / peer,
        "peer_to_read": peer / read,
    }


def test_the_table_has_the_largest_peak_rss_and_no_absolute_rate_target() -> None:
    run = shape_run(21_000.0, 100_000.0)
    rows = table_rows({"shapes": {"live": {"runs": [run]}}, "peak_rss_mb_by_run": [80.0, 300.0]})
    labels = [row[0] for row in rows]
    assert labels[:5] == [
        "live (11,000 msgs): (a) read limit, ev/s",  # no stage rows: run with --skip-stages
        "live: (b) worker drain, ev/s",
        "live: (b) second half of the messages only, ev/s",
        "live: (b') drain incl. start-up, ev/s",
        "live: (c) drain / read limit",
    ]
    assert rows[1][1:] == ("", "21,000", "21,000", "")  # judged as a ratio to the peer now
    assert rows[2][2] == "-"  # the second half was not measured
    assert labels[-2] == "live: license events per device"
    assert rows[-2][1:] == ("<= 1.05", "0.41", "0.41", "PASS")
    assert rows[-1][1:] == ("<= 256", "300.0", "80, 300", "FAIL")


def test_the_worker_and_the_peer_drain_in_turns_worker_first() -> None:
    assert [alternating_order(run) for run in (1, 2, 3)] == [
        ("worker", "peer"),
        ("peer", "worker"),
        ("worker", "peer"),
    ]


def test_cpu_per_event_counts_the_measured_window_after_the_first_batch() -> None:
    # 0.5 of a core for 2 s over the 10,000 messages after the first batch: 100 µs each.
    result = run_result(5_000.0, 11_000, 1_000, 2.0, {"worker": 0.5, "postgres": 0.25})
    assert cpu_us_per_event(result, "worker") == pytest.approx(100.0)
    assert cpu_us_per_event(result, "postgres") == pytest.approx(50.0)
    assert math.isnan(cpu_us_per_event(result, "kafka"))  # not found on this machine
    assert math.isnan(cpu_us_per_event(run_result(0.0, 1_000, 1_000, 0.0, {"worker": 1}), "worker"))


def test_cpu_per_event_after_the_first_round_is_of_its_own_window() -> None:
    """A fleet stored beforehand: its first round is written whatever the precision, so the
    window after it is measured apart; the other shapes have none (and no NaN median)."""
    runs = [shape_run(80_000.0, 100_000.0) for _ in range(3)]
    assert "worker_postgres_cpu_us_per_event_after_first_round" not in shape_medians(runs)
    for run in runs:
        run["drain"]["extra"]["after_first_round"] = {
            "events": 8_000,
            "seconds": 1.6,
            "cores_used": {"worker": 0.5, "postgres": 0.05},
        }
    # 0.05 of a core for 1.6 s over 8,000 events: 10 µs each.
    assert cpu_us_per_event_after_first_round(runs[0]["drain"], "postgres") == pytest.approx(10.0)
    medians = shape_medians(runs)
    assert medians["worker_postgres_cpu_us_per_event_after_first_round"] == pytest.approx(10.0)
    assert medians["worker_worker_cpu_us_per_event_after_first_round"] == pytest.approx(100.0)
    assert math.isnan(cpu_us_per_event_after_first_round(shape_run(1.0, 1.0)["drain"], "worker"))


def test_medians_of_the_ratios_to_the_peer_and_of_the_cpu_per_event() -> None:
    runs = [shape_run(80_000.0, 100_000.0), shape_run(60_000.0, 100_000.0)]
    runs.append(shape_run(95_000.0, 100_000.0))
    runs[2]["drain"]["extra"]["cores_used"]["postgres"] = 0.01
    medians = shape_medians(runs)
    assert medians["ratio_to_peer"] == pytest.approx(0.8)
    assert medians["peer_events_per_second"] == 100_000.0
    assert medians["peer_to_read"] == pytest.approx(1 / 3)
    assert medians["worker_worker_cpu_us_per_event"] == pytest.approx(100.0)
    assert medians["worker_postgres_cpu_us_per_event"] == pytest.approx(50.0)
    assert medians["peer_worker_cpu_us_per_event"] == pytest.approx(20.0)
    assert medians["peer_postgres_cpu_us_per_event"] == pytest.approx(10.0)
    del runs[0]["peer"]  # a run without the peer: no peer medians at all
    assert "ratio_to_peer" not in shape_medians(runs)


def test_verdicts_judge_the_ratio_to_the_peer_and_postgres_cpu_where_the_issue_sets_a_target() -> (
    None
):
    def medians(ratio: float, postgres: float) -> dict[str, Any]:
        return {
            "median": {
                "ratio_to_peer": ratio,
                "worker_postgres_cpu_us_per_event": postgres,
                "license_events_per_device": 0.4,
            }
        }

    verdicts = shape_verdicts(
        {
            "steady": medians(0.8, 1.2),
            "backlog": medians(0.59, 9.0),
            "first_sighting": medians(0.31, 40.0),
            "live": medians(0.1, 90.0),
        }
    )
    assert verdicts == {
        "steady_ratio_to_peer": "PASS",
        "steady_postgres_cpu_us_per_event": "FAIL",
        "backlog_ratio_to_peer": "FAIL",
        "first_sighting_ratio_to_peer": "PASS",
        "first_sighting_postgres_cpu_us_per_event": "PASS",
        "live_license_events_per_device": "PASS",  # live has no ratio target
    }
    assert TARGETS["steady_ratio_to_peer"] == 0.8
    assert TARGETS["first_sighting_ratio_to_peer"] == 0.3


def test_the_table_reports_each_shape_against_the_peer_and_the_read_limit() -> None:
    run = shape_run(70_000.0, 100_000.0, read=200_000.0)
    rows = {row[0]: row[1:] for row in table_rows({"shapes": {"steady": {"runs": [run]}}})}
    assert rows["steady: (p) minimal pipeline (peer), ev/s"][1] == "100,000"
    assert rows["steady: (r) worker drain / peer"] == (">= 0.8", "0.70", "0.70", "FAIL")
    assert rows["steady: (c) drain / read limit"][1] == "0.35"
    assert rows["steady: (p) peer / read limit"][1] == "0.50"
    assert rows["steady: worker CPU-µs per event, its process"][1] == "100.0"
    assert rows["steady: worker CPU-µs per event, Postgres"] == ("<= 1.0", "50.0", "50.0", "FAIL")
    assert rows["steady: peer CPU-µs per event, its process"][1] == "20.0"
    assert rows["steady: peer CPU-µs per event, Postgres"] == ("", "10.0", "10.0", "")

"""The benchmark's results as a reader sees them: the targets, medians and verdicts, the
machine it ran on, and the table printed at the end."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import psutil

from scripts.bench.code_under_test import REPO_ROOT
from scripts.bench.scenario import Services
from scripts.bench.stages import STAGE_LABELS, stage_rates

# Issue #17: throughput is judged as a ratio to the minimal pipeline (the peer) measured in
# the same run, on the same events (an absolute rate on a shared 2-core machine says little).
TARGETS = {
    "steady_ratio_to_peer": 0.8,
    "backlog_ratio_to_peer": 0.6,
    "first_sighting_ratio_to_peer": 0.3,
    # Postgres CPU of the worker's drain per event (first sighting: every event a new device).
    "steady_postgres_cpu_us_per_event": 1.0,
    "first_sighting_postgres_cpu_us_per_event": 40.0,
    "live_license_events_per_device": 1.05,
    "latency_p99_ms": 250,
    "peak_rss_mb": 256,
}
SHAPE_ORDER = ("live", "backlog", "first_sighting", "steady")
# Who drains first in a run: the worker in odd runs, the peer in even ones, so that neither
# always meets the broker's page cache or Postgres in the state the other left.
DRAINERS = ("worker", "peer")


def alternating_order(run: int) -> tuple[str, str]:
    return DRAINERS if run % 2 == 1 else (DRAINERS[1], DRAINERS[0])


def cpu_us_per_event(result: dict[str, Any], group: str) -> float:
    """CPU microseconds per event of a process group (`worker`: the worker or the peer;
    `postgres`) over a drain's measured window (after its first batch), from a RateResult as
    stored in the JSON; NaN if it was not measured."""
    cores = result.get("extra", {}).get("cores_used") or {}
    events = result["messages"] - result.get("extra", {}).get("first_progress_messages", 0)
    if group not in cores or events <= 0:
        return float("nan")
    return float(cores[group] * result["measured_seconds"] / events * 1e6)


def cpu_us_per_event_after_first_round(result: dict[str, Any], group: str) -> float:
    """As `cpu_us_per_event`, over the rounds after the first of a fleet stored beforehand
    (the first is written whatever the precision: the worker has just started); NaN when
    not measured."""
    window = result.get("extra", {}).get("after_first_round") or {}
    cores = window.get("cores_used") or {}
    if group not in cores or not window.get("events"):
        return float("nan")
    return float(cores[group] * window["seconds"] / window["events"] * 1e6)


def shape_medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    """The medians of a shape's runs, as written in the JSON."""
    medians = {
        "read_events_per_second": median(r["read"]["events_per_second"] for r in runs),
        **{
            f"{stage}_events_per_second": median(stage_rates(r)[stage] for r in runs)
            for stage in STAGE_LABELS
            if all(stage_rates(r) for r in runs)
        },
        "drain_events_per_second": median(r["drain"]["events_per_second"] for r in runs),
        "drain_second_half_events_per_second": median(
            known(r["drain"]["extra"].get("second_half_events_per_second")) for r in runs
        ),
        "drain_events_per_second_with_startup": median(
            r["drain"]["events_per_second_with_startup"] for r in runs
        ),
        "ratio": median(r["ratio"] for r in runs),
        "license_events_per_device": median(
            known(r["drain"]["extra"].get("license_events_per_device")) for r in runs
        ),
    }
    if all("peer" in r for r in runs):
        medians |= {
            "peer_events_per_second": median(r["peer"]["events_per_second"] for r in runs),
            "ratio_to_peer": median(r["ratio_to_peer"] for r in runs),
            "peer_to_read": median(r["peer_to_read"] for r in runs),
            **{
                f"{who}_{group}_cpu_us_per_event": median(
                    cpu_us_per_event(r[source], group) for r in runs
                )
                for who, source in (("worker", "drain"), ("peer", "peer"))
                for group in ("worker", "postgres")
            },
        }
    # A fleet stored beforehand only (no NaN in the JSON for the other shapes).
    if all(r["drain"]["extra"].get("after_first_round") for r in runs):
        medians |= {
            f"worker_{group}_cpu_us_per_event_after_first_round": median(
                cpu_us_per_event_after_first_round(r["drain"], group) for r in runs
            )
            for group in ("worker", "postgres")
        }
    return medians


def shape_verdicts(shapes: dict[str, dict[str, Any]]) -> dict[str, str]:
    """PASS or FAIL for every target a measured shape has (from its medians)."""
    verdicts = {}
    for name, shape in shapes.items():
        medians = shape["median"]
        for key, measure, higher in (
            ("ratio_to_peer", "ratio_to_peer", True),
            ("postgres_cpu_us_per_event", "worker_postgres_cpu_us_per_event", False),
            ("license_events_per_device", "license_events_per_device", False),
        ):
            target = TARGETS.get(f"{name}_{key}")
            if target is not None and measure in medians:
                verdicts[f"{name}_{key}"] = verdict(medians[measure], target, higher)
    return verdicts


def known(value: float | None) -> float:
    """A measured value, NaN where there is none (0 is a value: a steady drain's license
    events)."""
    return float("nan") if value is None else value


def median(values: Iterable[float]) -> float:
    items = list(values)
    return statistics.median(items) if items else float("nan")


def machine_info(services: Services, postgres_version: str) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    kafka_lib = Path(os.environ.get("KAFKA_LIB_DIR", REPO_ROOT / ".local" / "kafka-lib"))
    kafka_jars = (
        sorted(p.name for p in kafka_lib.glob("kafka_2.13-*.jar")) if kafka_lib.is_dir() else []
    )
    return {
        "cpu_count": psutil.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgres": postgres_version,
        "kafka": kafka_jars[0].removesuffix(".jar") if kafka_jars else "unknown",
        "kafka_bootstrap_servers": services.kafka_bootstrap_servers,
    }


def fmt(value: float, digits: int = 0) -> str:
    if value != value:  # NaN
        return "-"
    return f"{value:,.{digits}f}"


def verdict(value: float, target: float, higher_is_better: bool) -> str:
    if value != value:
        return ""
    ok = value >= target if higher_is_better else value <= target
    return "PASS" if ok else "FAIL"


Row = tuple[str, str, str, str, str]  # measure, target, median, runs, verdict


def measure_row(
    label: str, values: Sequence[float], digits: int = 0, target: str = "", check: str = ""
) -> Row:
    """A row of the table: the median of `values` and every value, `digits` after the point."""
    runs = ", ".join(fmt(x, digits) for x in values)
    return (label, target, fmt(median(values), digits), runs, check)


def shape_rows(shape: str, runs: list[dict[str, Any]]) -> list[Row]:
    """(a) to (c), and the peer (p) with the ratios to it (r), for one fleet shape."""
    reads = [r["read"]["events_per_second"] for r in runs]
    drains = [r["drain"]["events_per_second"] for r in runs]
    walls = [r["drain"]["events_per_second_with_startup"] for r in runs]
    halves = [known(r["drain"]["extra"].get("second_half_events_per_second")) for r in runs]
    ratios = [r["ratio"] for r in runs]
    per_device = [known(r["drain"]["extra"].get("license_events_per_device")) for r in runs]
    messages = runs[0]["messages"]
    rows = [measure_row(f"{shape} ({messages:,} msgs): (a) read limit, ev/s", reads)]
    if all(stage_rates(r) for r in runs):
        for stage, label in STAGE_LABELS.items():
            values = [stage_rates(r)[stage] for r in runs]
            rows.append(measure_row(f"{shape}: {label}, ev/s", values))
    rows += [
        measure_row(f"{shape}: (b) worker drain, ev/s", drains),
        measure_row(f"{shape}: (b) second half of the messages only, ev/s", halves),
        measure_row(f"{shape}: (b') drain incl. start-up, ev/s", walls),
        measure_row(f"{shape}: (c) drain / read limit", ratios, 2),
    ]
    if all("peer" in r for r in runs):
        rows += peer_rows(shape, runs)
    return [*rows, license_events_row(shape, per_device)]


def target_row(label: str, values: list[float], digits: int, key: str, higher: bool) -> Row:
    """A row compared with TARGETS[key] if there is one."""
    target = TARGETS.get(key)
    if target is None:
        return measure_row(label, values, digits)
    sign = ">=" if higher else "<="
    check = verdict(median(values), target, higher)
    return measure_row(label, values, digits, f"{sign} {target}", check)


def peer_rows(shape: str, runs: list[dict[str, Any]]) -> list[Row]:
    """The minimal pipeline (p), the worker's drain as a ratio to it (r), and the CPU per
    event of each, its process and Postgres apart."""
    rows = [
        measure_row(
            f"{shape}: (p) minimal pipeline (peer), ev/s",
            [r["peer"]["events_per_second"] for r in runs],
        ),
        target_row(
            f"{shape}: (r) worker drain / peer",
            [r["ratio_to_peer"] for r in runs],
            2,
            f"{shape}_ratio_to_peer",
            True,
        ),
        measure_row(f"{shape}: (p) peer / read limit", [r["peer_to_read"] for r in runs], 2),
    ]
    for who, source in (("worker", "drain"), ("peer", "peer")):
        rows.append(
            measure_row(
                f"{shape}: {who} CPU-µs per event, its process",
                [cpu_us_per_event(r[source], "worker") for r in runs],
                1,
            )
        )
        values = [cpu_us_per_event(r[source], "postgres") for r in runs]
        label = f"{shape}: {who} CPU-µs per event, Postgres"
        if who == "worker":
            rows.append(target_row(label, values, 1, f"{shape}_postgres_cpu_us_per_event", False))
        else:
            rows.append(measure_row(label, values, 1))
    if any(r["drain"]["extra"].get("after_first_round") for r in runs):
        for group, name in (("worker", "its process"), ("postgres", "Postgres")):
            rows.append(
                measure_row(
                    f"{shape}: worker CPU-µs per event, {name}, after the first round",
                    [cpu_us_per_event_after_first_round(r["drain"], group) for r in runs],
                    1,
                )
            )
        rows.append(
            measure_row(
                f"{shape}: heartbeats not written (precision), share",
                [
                    (r["drain"]["extra"].get("heartbeats_skipped") or 0) / r["messages"]
                    for r in runs
                ],
                2,
            )
        )
    return rows


def license_events_row(shape: str, per_device: list[float]) -> Row:
    """License events billing receives per device of the fleet (issue #18: no allocation
    that arrival order alone caused); the live shape has a ceiling."""
    label = f"{shape}: license events per device"
    ceiling = TARGETS.get(f"{shape}_license_events_per_device")
    if ceiling is None:
        return measure_row(label, per_device, 2)
    check = verdict(median(per_device), ceiling, False)
    return measure_row(label, per_device, 2, f"<= {ceiling}", check)


def latency_rows(latency: list[dict[str, Any]]) -> list[Row]:
    """(d) over the latency runs."""
    rate = latency[0]["target_rate"]
    rows = []
    for name, key, target in (
        ("p50", "p50_ms", None),
        ("p99", "p99_ms", TARGETS["latency_p99_ms"]),
        ("max", "max_ms", None),
    ):
        values = [r[key] for r in latency]
        label = f"(d) produce->committed {name}, ms @ {rate:,.0f} ev/s"
        if target is None:
            rows.append(measure_row(label, values, 1))
        else:
            check = verdict(median(values), target, False)
            rows.append(measure_row(label, values, 1, f"<= {target}", check))
    achieved = [r["achieved_rate"] for r in latency]
    return [*rows, measure_row("(d) achieved send rate, ev/s", achieved)]


def peak_rss_row(peaks: list[float]) -> Row:
    """(e) The largest peak of all runs, against the target."""
    peak, target = max(peaks), TARGETS["peak_rss_mb"]
    return (
        "(e) worker peak RSS, MB (max over all runs)",
        f"<= {target}",
        fmt(peak, 1),
        ", ".join(fmt(x, 0) for x in peaks),
        verdict(peak, target, False),
    )


def table_rows(results: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for shape in SHAPE_ORDER:
        runs = results["shapes"].get(shape, {}).get("runs", [])
        if runs:
            rows += shape_rows(shape, runs)
    latency = results.get("latency", {}).get("runs", [])
    if latency:
        rows += latency_rows(latency)
    peaks = results.get("peak_rss_mb_by_run", [])
    if peaks:
        rows.append(peak_rss_row(peaks))
    return rows


def print_table(results: dict[str, Any]) -> None:
    rows = table_rows(results)
    headers = ("measure", "target", "median", "runs", "")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print()
    print(line.format(*headers))
    print(line.format(*("-" * w for w in widths)))
    for row in rows:
        print(line.format(*row))
    print()

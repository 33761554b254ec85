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

TARGETS = {
    "live_events_per_second": 20_000,
    "backlog_events_per_second": 80_000,
    "live_license_events_per_device": 1.05,
    "latency_p99_ms": 250,
    "peak_rss_mb": 256,
}


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
    """(a) to (c) for one fleet shape, over its runs."""
    reads = [r["read"]["events_per_second"] for r in runs]
    drains = [r["drain"]["events_per_second"] for r in runs]
    walls = [r["drain"]["events_per_second_with_startup"] for r in runs]
    halves = [
        r["drain"]["extra"].get("second_half_events_per_second") or float("nan") for r in runs
    ]
    ratios = [r["ratio"] for r in runs]
    per_device = [
        r["drain"]["extra"].get("license_events_per_device") or float("nan") for r in runs
    ]
    target = TARGETS[f"{shape}_events_per_second"]
    messages = runs[0]["messages"]
    rows = [measure_row(f"{shape} ({messages:,} msgs): (a) read limit, ev/s", reads)]
    if all(stage_rates(r) for r in runs):
        for stage, label in STAGE_LABELS.items():
            values = [stage_rates(r)[stage] for r in runs]
            rows.append(measure_row(f"{shape}: {label}, ev/s", values))
    drain_verdict = verdict(median(drains), target, True)
    return [
        *rows,
        measure_row(f"{shape}: (b) worker drain, ev/s", drains, 0, f">= {target:,}", drain_verdict),
        measure_row(f"{shape}: (b) second half of the messages only, ev/s", halves),
        measure_row(f"{shape}: (b') drain incl. start-up, ev/s", walls),
        measure_row(f"{shape}: (c) drain / read limit", ratios, 2),
        license_events_row(shape, per_device),
    ]


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
    for shape in ("live", "backlog"):
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

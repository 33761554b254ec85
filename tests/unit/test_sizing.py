"""The sizing's arithmetic (scripts/sizing.py, docs/scaling.md "Sizing"): medians of the
benchmark's CPU per event, rows per event from the storage simulation's phases, each row's
formula with its rounding up, and the refusal of measurements or assumptions it cannot use."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from typing import Any

import pytest

from scripts.bench.report import cpu_us_per_event as bench_cpu_us_per_event
from scripts.sizing import (
    DEFAULT_BENCH,
    DEFAULT_STORAGE,
    REPO_ROOT,
    Assumptions,
    CpuBasis,
    SizingError,
    cores_for,
    cpu_basis,
    parse_overrides,
    partitions_for,
    rows_per_month,
    size_fleet,
    storage_basis,
)


def drain(worker_cores: float, postgres_cores: float, write_share: float = 0.5) -> dict[str, Any]:
    """A drain of 1,000,000 events measured over 10 s after a first batch of 0: µs per event
    = cores * 10."""
    return {
        "messages": 1_000_000,
        "events_per_second": 100_000.0,
        "measured_seconds": 10.0,
        "extra": {
            "first_progress_messages": 0,
            "cores_used": {"worker": worker_cores, "postgres": postgres_cores},
            "write_share": write_share,
        },
    }


def bench(*drains: dict[str, Any], peer: dict[str, Any] | None = None) -> dict[str, Any]:
    runs = [{"drain": d, **({"peer": peer} if peer else {})} for d in drains]
    return {"shapes": {"steady": {"runs": runs}}}


CPU = CpuBasis(
    source="test",
    shape="steady",
    runs=1,
    worker_us_per_event=70.0,
    postgres_us_per_event=30.0,
    write_share=0.5,
    drain_events_per_second=10_000.0,
)


def storage_measurement(**changes: Any) -> dict[str, Any]:
    """A storage simulation of 100 devices on 2 customers, with round figures."""
    tables = {
        "devices": {"rows": 100, "row_bytes": 100_000},
        "users": {"rows": 30, "row_bytes": 30_000},
        "licenses": {"rows": 40, "row_bytes": 20_000},
        "license_history": {"rows": 80, "row_bytes": 16_000},
        "device_lifecycle_events": {"rows": 130, "row_bytes": 13_000},
        "usage_snapshots": {"rows": 20, "row_bytes": 2_000},
        "device_history": {"rows": 200, "row_bytes": 40_000},
        "license_outbox": {"rows": 100, "row_bytes": 50_000},
    }
    phases = [
        {
            "phase": "install",
            "events": {"installs": 100},
            "rows_added": {
                "devices": 100,
                "users": 30,
                "licenses": 40,
                "license_history": 40,
                "device_lifecycle_events": 100,
                "device_history": 200,
                "license_outbox": 40,
            },
        },
        {
            "phase": "snapshots",
            "events": {"customer_days": 10},
            "rows_added": {"usage_snapshots": 10, "license_outbox": 10},
        },
        {
            "phase": "uninstall",
            "events": {"uninstalls": 20},
            "rows_added": {"device_lifecycle_events": 20, "license_history": 8},
        },
        {
            "phase": "reinstall",
            "events": {"reinstalls": 10},
            "rows_added": {"device_lifecycle_events": 10, "license_history": 4},
        },
        {
            "phase": "release",
            "events": {"silent_devices": 10, "customer_days": 2},
            "rows_added": {"license_history": 4, "license_outbox": 6, "usage_snapshots": 2},
        },
        {
            "phase": "purge",
            "events": {"customer_days": 2},
            "rows_added": {"license_history": 10, "license_outbox": 12, "usage_snapshots": 2},
        },
    ]
    return {"fleet": {"devices": 100}, "phases": phases, "tables": tables, **changes}


def test_the_cpu_basis_is_the_median_of_the_runs_by_the_benchmarks_formula() -> None:
    runs = [drain(3.0, 1.0, 0.4), drain(1.0, 3.0, 0.6), drain(2.0, 2.0, 0.5)]
    basis = cpu_basis(bench(*runs), "b.json")
    assert basis.worker_us_per_event == pytest.approx(20.0)
    assert basis.postgres_us_per_event == pytest.approx(20.0)
    assert basis.write_share == pytest.approx(0.5)
    assert basis.runs == 3
    assert bench_cpu_us_per_event(runs[0], "worker") == pytest.approx(30.0)


def test_the_peers_cpu_sizes_what_issue_17s_reference_would_need() -> None:
    peer = drain(0.5, 0.25)
    del peer["extra"]["write_share"]
    basis = cpu_basis(bench(drain(2.0, 2.0, 0.6), peer=peer), "b.json", drainer="peer")
    assert basis.worker_us_per_event == pytest.approx(5.0)
    assert basis.postgres_us_per_event == pytest.approx(2.5)
    assert basis.write_share == pytest.approx(0.6)  # the worker's: the peer has none
    with pytest.raises(SizingError, match="no peer drain"):
        cpu_basis(bench(drain(2.0, 2.0)), "b.json", drainer="peer")
    with pytest.raises(SizingError, match="unknown drainer"):
        cpu_basis(bench(drain(2.0, 2.0)), "b.json", drainer="bench")


def test_the_committed_benchmark_gives_the_figures_its_table_printed() -> None:
    measured = json.loads(DEFAULT_BENCH.read_text())
    basis = cpu_basis(measured, "bench")
    medians = measured["shapes"]["steady"]["median"]
    assert basis.worker_us_per_event == pytest.approx(medians["worker_worker_cpu_us_per_event"])
    assert basis.postgres_us_per_event == pytest.approx(medians["worker_postgres_cpu_us_per_event"])
    peer = cpu_basis(measured, "bench", drainer="peer")
    assert peer.worker_us_per_event == pytest.approx(medians["peer_worker_cpu_us_per_event"])
    assert peer.postgres_us_per_event == pytest.approx(medians["peer_postgres_cpu_us_per_event"])


def test_steady_and_drain_rates_replicas_and_cores_follow_their_formulas() -> None:
    storage = storage_basis(storage_measurement(), "s.json")
    size = size_fleet(3_000_000, CPU, storage, Assumptions())
    assert size.steady_events_per_second == pytest.approx(10_000)
    assert size.drain_events_per_second == pytest.approx(30_000)
    # 10,000 * 70 µs = 0.7 cores, at 70 %: exactly 1 replica (not 2 from rounding noise).
    assert size.worker_replicas_steady == 1
    assert size.worker_replicas_drain == 3
    # 30,000 * 30 µs = 0.9 cores, at 60 %: 1.5, rounded up.
    assert size.postgres_cores_drain == 2
    assert size.postgres_cores_steady == 1
    assert size.partitions == 24  # 3 * 2 = 6, under the minimum
    assert size.client_connections_drain == 3 * 8
    assert size.client_connections_max == 24 * 8
    assert size.server_pool == math.ceil(3 * 2 * 0.5) + 2


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1.0, 1), (1.0000001, 2), (0.0001, 1)],
)
def test_cores_are_rounded_up_but_an_exact_count_is_kept(value: float, expected: int) -> None:
    assert cores_for(value * 1e6, 1.0, 1.0) == expected


@pytest.mark.parametrize(("replicas", "partitions"), [(1, 24), (12, 24), (13, 36), (40, 84)])
def test_partitions_are_twice_the_drain_replicas_in_multiples_of_12(
    replicas: int, partitions: int
) -> None:
    assert partitions_for(replicas, Assumptions()) == partitions


def test_rows_per_event_take_the_phase_snapshots_away() -> None:
    storage = storage_basis(storage_measurement(), "s.json")
    per = storage.rows_per_event
    assert per["install"]["devices"] == 1.0
    assert per["install"]["users"] == pytest.approx(0.3)
    assert per["customer_day"] == {"license_outbox": 1.0, "usage_snapshots": 1.0}
    assert per["uninstall"]["license_history"] == pytest.approx(0.4)
    # Release: 6 outbox rows less 2 customer-days' snapshot events, over 10 silent devices.
    assert per["retire_silent"]["license_outbox"] == pytest.approx(0.4)
    assert per["retire_silent"]["usage_snapshots"] == 0.0
    # Purge: over the devices gone for good, 20 - 10 + 10.
    assert per["purge"]["license_history"] == pytest.approx(0.5)
    assert storage.bytes_per_row["devices"] == 1_000
    assert storage.bytes_per_row["license_outbox"] == 500


def test_monthly_rows_and_bytes_sum_every_kind_of_event() -> None:
    storage = storage_basis(storage_measurement(), "s.json")
    assumptions = Assumptions(
        retirements_per_device_month=0.02,
        uninstalled_share_of_retirements=0.5,
        reinstalls_per_device_month=0.01,
        devices_per_customer=1_000,
    )
    rows = rows_per_month(1_000_000, storage, assumptions)
    # license_history per device: installs 0.02 * 0.4 + uninstalls (0.01 + 0.01) * 0.4
    # + reinstalls 0.01 * 0.4 + silent 0.01 * 0.4 + purges 0.02 * 0.5 = 0.034
    assert rows["license_history"] == pytest.approx(1_000_000 * 0.034)
    days = 365.25 / 12
    assert rows["usage_snapshots"] == pytest.approx(1_000 * days)
    size = size_fleet(1_000_000, CPU, storage, assumptions)
    assert size.growth_gb_per_month_by_table["license_history"] == pytest.approx(34_000 * 200 / 1e9)
    # Fleet state: devices 1 * 1000 + users 0.3 * 1000 + licenses 0.4 * 500 bytes a device.
    assert size.state_gb == pytest.approx(1_000_000 * 1_500 / 1e9)
    # The outbox keeps 7 days: it stops growing within the month, so it is no monthly growth;
    # once the retentions are reached it holds 7 days of events.
    by_table = size.growth_gb_per_month_by_table
    assert size.growth_gb_per_month == pytest.approx(
        sum(gb for table, gb in by_table.items() if table != "license_outbox")
    )
    expected = size.state_gb + by_table["license_outbox"] * 7 / days
    expected += (by_table["license_history"] + by_table["usage_snapshots"]) * 25
    expected += by_table["device_lifecycle_events"] * 13 + by_table["device_history"] * 25
    assert size.retained_gb == pytest.approx(expected)


def nonsense_cpu(**changes: Any) -> CpuBasis:
    return replace(CPU, **changes)


@pytest.mark.parametrize(
    "cpu",
    [
        nonsense_cpu(worker_us_per_event=0.0),
        nonsense_cpu(postgres_us_per_event=-1.0),
        nonsense_cpu(worker_us_per_event=float("nan")),
        nonsense_cpu(write_share=0.0),
        nonsense_cpu(write_share=1.5),
    ],
)
def test_a_cpu_basis_without_throughput_is_refused(cpu: CpuBasis) -> None:
    storage = storage_basis(storage_measurement(), "s.json")
    with pytest.raises(SizingError):
        size_fleet(1_000_000, cpu, storage, Assumptions())


@pytest.mark.parametrize("devices", [0, -5])
def test_an_empty_fleet_is_refused(devices: int) -> None:
    storage = storage_basis(storage_measurement(), "s.json")
    with pytest.raises(SizingError, match="devices"):
        size_fleet(devices, CPU, storage, Assumptions())


@pytest.mark.parametrize(
    "changes",
    [
        {"worker_core_utilisation": 0.0},
        {"postgres_core_utilisation": 1.2},
        {"drain_multiple": 0.5},
        {"heartbeat_interval_seconds": 0.0},
        {"devices_per_customer": -1.0},
        {"uninstalled_share_of_retirements": 2.0},
        {"reinstalls_per_device_month": -0.1},
        {"partition_multiple": 0},
    ],
)
def test_nonsense_assumptions_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(SizingError):
        Assumptions(**changes)


def test_a_benchmark_without_runs_or_cpu_is_refused() -> None:
    with pytest.raises(SizingError, match="no runs"):
        cpu_basis({"shapes": {}}, "b.json")
    with pytest.raises(SizingError, match="no runs"):
        cpu_basis(bench(), "b.json")
    unmeasured = drain(1.0, 1.0)
    unmeasured["extra"]["cores_used"] = {}
    with pytest.raises(SizingError, match="not measured"):
        cpu_basis(bench(unmeasured), "b.json")
    with pytest.raises(SizingError):
        cpu_basis(bench(drain(0.0, 1.0)), "b.json")


def test_a_storage_measurement_with_missing_rows_or_events_is_refused() -> None:
    empty = storage_measurement()
    empty["tables"]["license_history"] = {"rows": 0, "row_bytes": 0}
    with pytest.raises(SizingError, match="license_history"):
        storage_basis(empty, "s.json")
    no_uninstalls = storage_measurement()
    no_uninstalls["phases"][2]["events"]["uninstalls"] = 0
    with pytest.raises(SizingError, match="uninstall"):
        storage_basis(no_uninstalls, "s.json")
    no_phase = storage_measurement(phases=[])
    with pytest.raises(SizingError, match="phase"):
        storage_basis(no_phase, "s.json")


def test_overrides_name_known_assumptions_with_numbers() -> None:
    assert parse_overrides(["drain_multiple=4", "write_concurrency=3"]) == {
        "drain_multiple": 4.0,
        "write_concurrency": 3,
    }
    with pytest.raises(SizingError, match="unknown"):
        parse_overrides(["drain=4"])
    with pytest.raises(SizingError, match="not a number"):
        parse_overrides(["drain_multiple=lots"])


def test_the_command_prints_the_table_from_the_committed_measurements() -> None:
    assert DEFAULT_STORAGE.exists()
    done = subprocess.run(
        [sys.executable, "-m", "scripts.sizing"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "| 1M devices | 10M devices | 50M devices |" in done.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "scripts.sizing", "--set", "drain_multiple=0"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2
    assert "drain_multiple" in refused.stderr


def test_the_compact_fleet_state_uses_the_sizes_after_vacuum_full() -> None:
    measured = storage_measurement()
    measured["tables"]["devices"]["compact_row_bytes"] = 50_000  # 500 a row, not 1,000
    storage = storage_basis(measured, "s.json")
    size = size_fleet(1_000_000, CPU, storage, Assumptions())
    assert size.state_gb == pytest.approx(1_000_000 * 1_500 / 1e9)
    assert size.state_compact_gb == pytest.approx(1_000_000 * 1_000 / 1e9)


def sizing_output(*arguments: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "scripts.sizing", *arguments],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout


def test_the_tables_in_docs_scaling_md_are_the_commands_output() -> None:
    """docs/scaling.md shows the sizing of the committed measurements: rerun
    `python -m scripts.sizing` (and `--drainer peer`) and paste the tables when they
    change."""
    document = (REPO_ROOT / "docs" / "scaling.md").read_text()
    sizing, growth = sizing_output().split("\n\n")[:2]
    stale = [line for line in (sizing + "\n" + growth).splitlines() if line not in document]
    assert not stale, "docs/scaling.md's sizing is not the script's output:\n" + "\n".join(stale)
    start = document.index("### With the minimal pipeline's costs")
    section = document[start : document.index("\n### ", start + 1)]
    peer = sizing_output("--drainer", "peer").split("\n\n")[0].splitlines()
    shown = [line for line in section.splitlines() if line.startswith("| ")][2:]
    assert shown, "the peer's rows are missing"
    assert [line for line in shown if line not in peer] == []

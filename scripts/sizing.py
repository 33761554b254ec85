"""Sizing from measurements (docs/scaling.md, "Sizing"): Kafka partitions, worker replicas,
Postgres cores, connections through PgBouncer and storage for fleets of 1, 10 and 50
million devices.

    .venv/bin/python -m scripts.sizing [--bench FILE] [--storage FILE] [--devices 1e6,1e7]

Two measurements, nothing else measured:
  --bench    the ingestion benchmark's result JSON (python -m scripts.bench; the steady shape:
             a stored fleet heartbeating every 5 minutes): CPU-µs per event of the worker's
             process and of Postgres, and the share of time a replica spends writing;
  --storage  python -m scripts.storage_growth's result JSON (the real worker over a simulated
             fleet): rows each kind of event adds to each table, and bytes per row.
Everything else is an assumption, named in `Assumptions` with where it comes from, and can be
changed on the command line. The logic (`size_fleet`) is pure; only `main` reads files.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
MEASUREMENTS = REPO_ROOT / "docs" / "measurements"
DEFAULT_BENCH = MEASUREMENTS / "bench-steady-2026-12-03.json"
DEFAULT_STORAGE = MEASUREMENTS / "storage-growth-2026-12-03.json"
FLEETS = (1_000_000, 10_000_000, 50_000_000)
DAYS_PER_MONTH = 365.25 / 12
GB = 1e9

# Tables that hold the fleet's current state (one row per device, user, license): their size
# follows the fleet, not time.
STATE_TABLES = ("devices", "users", "licenses")
# Tables that grow with time, and the months each keeps (None: kept for ever).
GROWING_TABLES = (
    "license_history",
    "device_lifecycle_events",
    "usage_snapshots",
    "device_history",
    "license_outbox",
)


class SizingError(ValueError):
    """A measurement or an assumption the sizing cannot use (zero throughput, a missing
    field, a share outside 0..1)."""


@dataclass(frozen=True)
class Assumptions:
    """Every figure the sizing uses that is not measured. Each field's comment says where it
    comes from; the command line overrides any of them (--set name=value)."""

    # The issue (#15): a heartbeat every 5 minutes per device.
    heartbeat_interval_seconds: float = 300.0
    # "Several times" the steady rate while a backlog drains (#15): at 3, a backlog of T
    # minutes is caught up in T/2 minutes while live traffic goes on.
    drain_multiple: float = 3.0
    # A replica is one Python process: at most one core. Kept at 70 % so that a drain at the
    # sized rate leaves room for GC pauses, rebalances and the leaders' work.
    worker_core_utilisation: float = 0.7
    # Postgres kept at 60 % of its cores at the sized rate: vacuum, checkpoints, the sweeper,
    # reports and the relay share them (not in the benchmark's drain).
    postgres_core_utilisation: float = 0.6
    # Partitions cannot shrink and adding some moves devices between replicas (#15 part 1):
    # twice the replicas a drain needs, rounded up to a multiple of 12, never under the
    # TOPIC_PARTITIONS default of 24.
    partition_headroom: float = 2.0
    partition_multiple: int = 12
    minimum_partitions: int = 24
    # worker/settings.py defaults: each replica's pools and concurrent write transactions.
    database_pool_size: int = 4
    background_pool_size: int = 4
    write_concurrency: int = 2
    # The sweeper's and the relay's leaders each hold a connection while they work.
    leader_connections: int = 2
    # Fleet changes per device and month. No field data: a device is replaced every 4 years
    # (1/48 a month); half the replaced devices uninstall the agent, half fall silent (lost,
    # wiped); 1 % a month reinstall the agent (reimaged).
    retirements_per_device_month: float = 1 / 48
    uninstalled_share_of_retirements: float = 0.5
    reinstalls_per_device_month: float = 0.01
    # Customers' average size: daily usage snapshots are one per customer (the benchmark's
    # fleet has 2,000 devices a customer; MSP customers are smaller).
    devices_per_customer: float = 1_000.0
    # Months each growing table keeps (#15 part 3's defaults: 25 months of history and
    # snapshots, 13 of lifecycle events; device_history has no retention; the outbox keeps
    # published events OUTBOX_RETENTION_DAYS = 7 days).
    license_history_retention_months: float = 25.0
    lifecycle_events_retention_months: float = 13.0
    usage_snapshots_retention_months: float = 25.0
    outbox_retention_days: float = 7.0

    def __post_init__(self) -> None:
        positive = (
            "heartbeat_interval_seconds",
            "devices_per_customer",
            "license_history_retention_months",
            "lifecycle_events_retention_months",
            "usage_snapshots_retention_months",
            "outbox_retention_days",
            "partition_headroom",
        )
        for name in positive:
            _require(getattr(self, name) > 0, f"{name} must be above 0")
        for name in ("worker_core_utilisation", "postgres_core_utilisation"):
            value = getattr(self, name)
            _require(0 < value <= 1, f"{name} must be in (0, 1], not {value}")
        _require(self.drain_multiple >= 1, "drain_multiple must be at least 1")
        for name in ("partition_multiple", "minimum_partitions", "write_concurrency"):
            _require(getattr(self, name) >= 1, f"{name} must be at least 1")
        for name in (
            "database_pool_size",
            "background_pool_size",
            "leader_connections",
            "retirements_per_device_month",
            "reinstalls_per_device_month",
        ):
            _require(getattr(self, name) >= 0, f"{name} must not be negative")
        _require(
            0 <= self.uninstalled_share_of_retirements <= 1,
            "uninstalled_share_of_retirements must be in [0, 1]",
        )

    def retention_months(self, table: str) -> float | None:
        """Months a growing table keeps; None: kept for ever."""
        return {
            "license_history": self.license_history_retention_months,
            "device_lifecycle_events": self.lifecycle_events_retention_months,
            "usage_snapshots": self.usage_snapshots_retention_months,
            "license_outbox": self.outbox_retention_days / DAYS_PER_MONTH,
        }.get(table)


@dataclass(frozen=True)
class CpuBasis:
    """From the benchmark: medians over the runs of one shape."""

    source: str
    shape: str
    runs: int
    worker_us_per_event: float  # of the drainer's process: the worker, or the peer
    postgres_us_per_event: float
    write_share: float
    drain_events_per_second: float
    drainer: str = "worker"


@dataclass(frozen=True)
class StorageBasis:
    """From the storage simulation: rows per event of each kind, per table, and bytes per
    row. Kinds: install (a new device), uninstall, reinstall, retire_silent (a device that
    falls silent and is released by the sweep), purge (per retired device: its user's and
    host name's purge 90 days after the release), customer_day (one sweep day of a
    customer: the usage snapshot)."""

    source: str
    devices: int
    rows_per_event: Mapping[str, Mapping[str, float]]
    bytes_per_row: Mapping[str, float]
    measured_rows: Mapping[str, int] = field(default_factory=dict)
    # After VACUUM FULL: without the free space updates leave (a lower bound).
    compact_bytes_per_row: Mapping[str, float] = field(default_factory=dict)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SizingError(message)


def _finite_positive(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SizingError(f"{what} is not a number: {value!r}") from None
    _require(math.isfinite(number) and number > 0, f"{what} must be a positive number: {value}")
    return number


def _median(values: Iterable[float], what: str) -> float:
    items = [v for v in values if v == v]  # NaN: not measured in that run
    _require(bool(items), f"{what}: not measured in any run")
    return float(statistics.median(items))


def cpu_us_per_event(result: Mapping[str, Any], group: str) -> float:
    """CPU-µs per event of a process group over a drain's measured window: the formula of
    scripts/bench/report.py `cpu_us_per_event` (cores * measured seconds / events after the
    first batch)."""
    extra = result.get("extra", {})
    cores = (extra.get("cores_used") or {}).get(group)
    events = result["messages"] - extra.get("first_progress_messages", 0)
    if cores is None or events <= 0:
        return float("nan")
    return float(cores) * float(result["measured_seconds"]) / float(events) * 1e6


DRAINERS = {"worker": "drain", "peer": "peer"}


def cpu_basis(
    bench: Mapping[str, Any], source: str, shape: str = "steady", drainer: str = "worker"
) -> CpuBasis:
    """The medians over the runs of `shape` in a benchmark result: of the worker's drain, or
    (`drainer="peer"`) of the minimal pipeline's drain of the same events, issue #17's
    reference (the write share is the worker's either way: the peer has none)."""
    _require(drainer in DRAINERS, f"unknown drainer {drainer!r}")
    try:
        runs = bench["shapes"][shape]["runs"]
    except KeyError:
        raise SizingError(f"{source}: no runs of the {shape!r} shape") from None
    _require(bool(runs), f"{source}: no runs of the {shape!r} shape")
    _require(all(DRAINERS[drainer] in run for run in runs), f"{source}: no {drainer} drain")
    drains = [run[DRAINERS[drainer]] for run in runs]
    writes = [run["drain"] for run in runs]
    return CpuBasis(
        source=source,
        shape=shape,
        drainer=drainer,
        runs=len(runs),
        worker_us_per_event=_finite_positive(
            _median((cpu_us_per_event(d, "worker") for d in drains), "worker CPU"),
            "the worker's CPU-µs per event",
        ),
        postgres_us_per_event=_finite_positive(
            _median((cpu_us_per_event(d, "postgres") for d in drains), "Postgres CPU"),
            "Postgres's CPU-µs per event",
        ),
        write_share=_share(
            _median((d["extra"].get("write_share", float("nan")) for d in writes), "write share")
        ),
        drain_events_per_second=_finite_positive(
            _median((d["events_per_second"] for d in drains), "drain rate"), "the drain rate"
        ),
    )


def _share(value: float) -> float:
    _require(0 < value <= 1, f"the write share must be in (0, 1], not {value}")
    return value


def _phase(storage: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    for phase in storage.get("phases", []):
        if phase["phase"] == name:
            return phase  # type: ignore[no-any-return]
    raise SizingError(f"the storage measurement has no {name!r} phase")


def _per_event(
    phase: Mapping[str, Any], count: float, less: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Rows a phase added per table, over `count` events, after taking away `less` (rows
    the phase's other work added, e.g. its day's snapshots)."""
    count = _finite_positive(count, f"the event count of phase {phase['phase']!r}")
    less = less or {}
    tables = set(phase["rows_added"]) | set(less)
    return {
        table: (phase["rows_added"].get(table, 0) - less.get(table, 0)) / count
        for table in sorted(tables)
        if table in GROWING_TABLES + STATE_TABLES
    }


def storage_basis(storage: Mapping[str, Any], source: str) -> StorageBasis:
    """Rows per event of each kind, per table, from the simulation's phases."""
    events = {name: _phase(storage, name)["events"] for name in _PHASES}
    snapshots = _phase(storage, "snapshots")
    per_customer_day = _per_event(snapshots, events["snapshots"]["customer_days"])

    def with_snapshots(name: str) -> dict[str, float]:
        days = events[name].get("customer_days", 0)
        return {table: rows * days for table, rows in per_customer_day.items()}

    uninstalled = events["uninstall"]["uninstalls"]
    returned = events["reinstall"]["reinstalls"]
    silent = events["release"]["silent_devices"]
    rows = {
        "install": _per_event(_phase(storage, "install"), events["install"]["installs"]),
        "uninstall": _per_event(_phase(storage, "uninstall"), uninstalled),
        "reinstall": _per_event(_phase(storage, "reinstall"), returned),
        "retire_silent": _per_event(_phase(storage, "release"), silent, with_snapshots("release")),
        # The purge phase purges what left for good: uninstalled and not back, and silent.
        "purge": _per_event(
            _phase(storage, "purge"), uninstalled - returned + silent, with_snapshots("purge")
        ),
        "customer_day": per_customer_day,
    }
    tables = storage.get("tables", {})
    bytes_per_row = {}
    for table in GROWING_TABLES + STATE_TABLES:
        measured = tables.get(table, {})
        _require(bool(measured.get("rows")), f"{source}: table {table} has no rows measured")
        bytes_per_row[table] = _finite_positive(
            measured["row_bytes"] / measured["rows"], f"bytes per row of {table}"
        )
    compact = {
        table: tables[table]["compact_row_bytes"] / tables[table]["rows"]
        for table in GROWING_TABLES + STATE_TABLES
        if tables[table].get("compact_row_bytes")
    }
    devices = int(_finite_positive(storage["fleet"]["devices"], "the simulated fleet"))
    return StorageBasis(
        source=source,
        devices=devices,
        rows_per_event=rows,
        bytes_per_row=bytes_per_row,
        measured_rows={t: int(tables[t]["rows"]) for t in GROWING_TABLES + STATE_TABLES},
        compact_bytes_per_row=compact,
    )


_PHASES = ("install", "snapshots", "uninstall", "reinstall", "release", "purge")


@dataclass(frozen=True)
class FleetSize:
    devices: int
    steady_events_per_second: float
    drain_events_per_second: float
    worker_replicas_steady: int
    worker_replicas_drain: int
    partitions: int
    postgres_cores_steady: int
    postgres_cores_drain: int
    client_connections_drain: int
    client_connections_max: int
    server_pool: int
    state_gb: float
    state_compact_gb: float
    growth_gb_per_month: float
    retained_gb: float
    rows_per_month: Mapping[str, float]
    growth_gb_per_month_by_table: Mapping[str, float]


def events_per_device_month(assumptions: Assumptions) -> dict[str, float]:
    """How often each kind of event of the storage basis happens, per device and month
    (customer_day: per customer and day, scaled in `rows_per_month`)."""
    retire = assumptions.retirements_per_device_month
    uninstalled = retire * assumptions.uninstalled_share_of_retirements
    reinstall = assumptions.reinstalls_per_device_month
    return {
        "install": retire,  # each retired device is replaced by a new one
        "uninstall": uninstalled + reinstall,
        "reinstall": reinstall,
        "retire_silent": retire - uninstalled,
        "purge": retire,
    }


def rows_per_month(
    devices: int, storage: StorageBasis, assumptions: Assumptions
) -> dict[str, float]:
    """Rows each growing table gains a month: per device, Σ kind rate * rows per event of
    that kind; plus customers * days a month * rows per customer-day."""
    rates = events_per_device_month(assumptions)
    customers = devices / assumptions.devices_per_customer
    totals = dict.fromkeys(GROWING_TABLES, 0.0)
    for kind, rate in rates.items():
        for table, rows in storage.rows_per_event.get(kind, {}).items():
            if table in totals:
                totals[table] += devices * rate * rows
    for table, rows in storage.rows_per_event.get("customer_day", {}).items():
        if table in totals:
            totals[table] += customers * DAYS_PER_MONTH * rows
    return totals


def partitions_for(replicas: int, assumptions: Assumptions) -> int:
    """max(minimum, ⌈replicas * headroom / multiple⌉ * multiple)."""
    multiple = assumptions.partition_multiple
    wanted = round_up(replicas * assumptions.partition_headroom / multiple) * multiple
    return max(assumptions.minimum_partitions, wanted)


def round_up(value: float) -> int:
    """⌈value⌉, without floating-point noise turning an exact 2 into 3."""
    return math.ceil(round(value, 9))


def cores_for(events_per_second: float, us_per_event: float, utilisation: float) -> int:
    """Cores that carry `events_per_second` at `us_per_event` CPU each, kept at
    `utilisation`: ⌈rate * µs / 10⁶ / utilisation⌉."""
    return round_up(events_per_second * us_per_event / 1e6 / utilisation)


def size_fleet(
    devices: int, cpu: CpuBasis, storage: StorageBasis, assumptions: Assumptions
) -> FleetSize:
    """Every figure of the sizing table for one fleet (docs/scaling.md gives each formula)."""
    _require(isinstance(devices, int) and devices > 0, f"devices must be positive: {devices}")
    _finite_positive(cpu.worker_us_per_event, "the worker's CPU-µs per event")
    _finite_positive(cpu.postgres_us_per_event, "Postgres's CPU-µs per event")
    _share(cpu.write_share)
    steady = devices / assumptions.heartbeat_interval_seconds
    drain = steady * assumptions.drain_multiple
    # One replica: one process, one core at most.
    replicas_steady = cores_for(
        steady, cpu.worker_us_per_event, assumptions.worker_core_utilisation
    )
    replicas_drain = cores_for(drain, cpu.worker_us_per_event, assumptions.worker_core_utilisation)
    partitions = partitions_for(replicas_drain, assumptions)
    per_replica = assumptions.database_pool_size + assumptions.background_pool_size
    server_pool = (
        round_up(replicas_drain * assumptions.write_concurrency * cpu.write_share)
        + assumptions.leader_connections
    )
    monthly = rows_per_month(devices, storage, assumptions)
    growth = {table: monthly[table] * storage.bytes_per_row[table] / GB for table in monthly}
    retained = 0.0
    for table, gb in growth.items():
        months = assumptions.retention_months(table)
        # Kept for ever (device_history): its size after the longest retention is shown.
        retained += gb * (months if months is not None else _longest_retention(assumptions))
    state_gb = state_size_gb(devices, storage, storage.bytes_per_row)
    state_compact_gb = state_size_gb(
        devices, storage, {**storage.bytes_per_row, **storage.compact_bytes_per_row}
    )
    return FleetSize(
        devices=devices,
        steady_events_per_second=steady,
        drain_events_per_second=drain,
        worker_replicas_steady=replicas_steady,
        worker_replicas_drain=replicas_drain,
        partitions=partitions,
        postgres_cores_steady=cores_for(
            steady, cpu.postgres_us_per_event, assumptions.postgres_core_utilisation
        ),
        postgres_cores_drain=cores_for(
            drain, cpu.postgres_us_per_event, assumptions.postgres_core_utilisation
        ),
        client_connections_drain=replicas_drain * per_replica,
        client_connections_max=partitions * per_replica,
        server_pool=server_pool,
        state_gb=state_gb,
        state_compact_gb=state_compact_gb,
        growth_gb_per_month=sum(
            gb for table, gb in growth.items() if _kept_a_month_or_more(table, assumptions)
        ),
        retained_gb=state_gb + retained,
        rows_per_month=monthly,
        growth_gb_per_month_by_table=growth,
    )


def _kept_a_month_or_more(table: str, assumptions: Assumptions) -> bool:
    """A table that keeps less than a month (the outbox) stops growing within the month."""
    months = assumptions.retention_months(table)
    return months is None or months >= 1


def state_size_gb(devices: int, storage: StorageBasis, bytes_per_row: Mapping[str, float]) -> float:
    """devices * Σ state tables (rows per install * bytes per row)."""
    install = storage.rows_per_event["install"]
    per_device = sum(install.get(table, 0.0) * bytes_per_row[table] for table in STATE_TABLES)
    return devices * per_device / GB


def _longest_retention(assumptions: Assumptions) -> float:
    return max(
        assumptions.license_history_retention_months,
        assumptions.lifecycle_events_retention_months,
        assumptions.usage_snapshots_retention_months,
    )


# Row label, formula, and the measurement (or assumption) it rests on: printed with the table.
ROWS: tuple[tuple[str, str, str], ...] = (
    ("steady events/s", "devices / heartbeat_interval_seconds", "assumption (#15)"),
    ("drain events/s", "steady * drain_multiple", "assumption"),
    (
        "worker replicas, steady",
        "⌈steady * worker µs/event / 10⁶ / worker_core_utilisation⌉",
        "bench: worker µs/event",
    ),
    (
        "worker replicas, drain",
        "⌈drain * worker µs/event / 10⁶ / worker_core_utilisation⌉",
        "bench: worker µs/event",
    ),
    (
        "Kafka partitions (agent topics)",
        "max(minimum_partitions, ⌈replicas drain * partition_headroom / 12⌉ * 12)",
        "bench, via replicas drain",
    ),
    (
        "Postgres cores, steady",
        "⌈steady * Postgres µs/event / 10⁶ / postgres_core_utilisation⌉",
        "bench: Postgres µs/event",
    ),
    (
        "Postgres cores, drain",
        "⌈drain * Postgres µs/event / 10⁶ / postgres_core_utilisation⌉",
        "bench: Postgres µs/event",
    ),
    (
        "PgBouncer client connections, drain",
        "replicas drain * (DATABASE_POOL_SIZE + BACKGROUND_POOL_SIZE)",
        "settings defaults",
    ),
    (
        "PgBouncer max_client_conn (KEDA max = partitions)",
        "partitions * (DATABASE_POOL_SIZE + BACKGROUND_POOL_SIZE)",
        "settings defaults",
    ),
    (
        "PgBouncer server pool (default_pool_size)",
        "⌈replicas drain * WRITE_CONCURRENCY * write share⌉ + leader_connections",
        "bench: write share",
    ),
    (
        "fleet state, GB (compact)",
        "devices * Σ(state table rows per install * bytes per row)",
        "storage: install phase, bytes/row",
    ),
    (
        "storage growth, GB a month",
        "Σ tables kept a month or more (devices * Σ kinds rate * rows/event"
        " + customers * days * rows/customer-day) * bytes/row",
        "storage: phases, bytes/row; rates assumed",
    ),
    (
        "size once retention is reached, GB",
        "fleet state + Σ tables growth * months kept (outbox: 7 days; device_history,"
        " kept for ever: 25 months shown)",
        "storage; #15 part 3's retentions",
    ),
)


def table_cells(size: FleetSize) -> list[str]:
    """The cells of one fleet's column, in the order of ROWS."""
    return [
        f"{size.steady_events_per_second:,.0f}",
        f"{size.drain_events_per_second:,.0f}",
        f"{size.worker_replicas_steady}",
        f"{size.worker_replicas_drain}",
        f"{size.partitions}",
        f"{size.postgres_cores_steady}",
        f"{size.postgres_cores_drain}",
        f"{size.client_connections_drain:,}",
        f"{size.client_connections_max:,}",
        f"{size.server_pool}",
        f"{size.state_gb:,.1f} ({size.state_compact_gb:,.1f})",
        f"{size.growth_gb_per_month:,.2f}",
        f"{size.retained_gb:,.0f}",
    ]


def markdown_table(sizes: list[FleetSize]) -> str:
    header = ["", *(f"{s.devices / 1e6:g}M devices" for s in sizes), "formula", "from"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    columns = [table_cells(size) for size in sizes]
    for index, (label, formula, source) in enumerate(ROWS):
        cells = [label, *(column[index] for column in columns), formula, source]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def growth_table(sizes: list[FleetSize], assumptions: Assumptions) -> str:
    """Rows and GB a month per growing table (the storage growth row, split), and how long
    each table keeps them."""
    header = ["table", *(f"{s.devices / 1e6:g}M: rows, GB a month" for s in sizes), "kept"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for table in GROWING_TABLES:
        cells = [
            f"{s.rows_per_month[table]:,.0f}, {s.growth_gb_per_month_by_table[table]:,.2f}"
            for s in sizes
        ]
        months = assumptions.retention_months(table)
        kept = "for ever" if months is None else f"{months:.3g} months"
        lines.append("| " + " | ".join([f"`{table}`", *cells, kept]) + " |")
    return "\n".join(lines)


def basis_table(cpu: CpuBasis, storage: StorageBasis) -> str:
    """The measured figures the sizing used."""
    lines = [
        "| measured | value | from |",
        "|---|---|---|",
        f"| {cpu.drainer} CPU-µs per event | {cpu.worker_us_per_event:.1f} | {cpu.source}, "
        f"{cpu.shape} shape, the {cpu.drainer}'s drain, median of {cpu.runs} run(s) |",
        f"| Postgres CPU-µs per event | {cpu.postgres_us_per_event:.1f} | the same |",
        f"| write share (time a replica writes) | {cpu.write_share:.2f} | the same, the worker's |",
        f"| drain events/s (one replica, 2 shared cores) | {cpu.drain_events_per_second:,.0f}"
        " | the same |",
    ]
    for table in STATE_TABLES + GROWING_TABLES:
        compact = storage.compact_bytes_per_row.get(table)
        shown = f" ({compact:,.0f} compact)" if compact else ""
        lines.append(
            f"| `{table}` bytes per row (heap, indexes, TOAST) | "
            f"{storage.bytes_per_row[table]:,.0f}{shown} | {storage.source}, "
            f"{storage.measured_rows.get(table, 0):,} rows |"
        )
    for kind, rows in storage.rows_per_event.items():
        shown = ", ".join(f"{table} {value:.3g}" for table, value in rows.items() if value)
        lines.append(f"| rows per {kind} | {shown or '-'} | {storage.source} |")
    return "\n".join(lines)


def parse_overrides(pairs: Iterable[str]) -> dict[str, float | int]:
    """`name=value` pairs for Assumptions; unknown names and non-numbers are refused."""
    known = {f.name: f.type for f in fields(Assumptions)}
    values: dict[str, float | int] = {}
    for pair in pairs:
        name, _, text = pair.partition("=")
        _require(name in known, f"unknown assumption {name!r} (known: {', '.join(known)})")
        try:
            values[name] = int(text) if known[name] in ("int", int) else float(text)
        except ValueError:
            raise SizingError(f"{name}: not a number: {text!r}") from None
    return values


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.sizing", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--bench", type=Path, default=DEFAULT_BENCH)
    parser.add_argument("--shape", default="steady", help="the benchmark shape to size from")
    parser.add_argument(
        "--drainer",
        choices=sorted(DRAINERS),
        default="worker",
        help="whose CPU per event: the worker's, or the minimal pipeline's (issue #17's peer)",
    )
    parser.add_argument("--storage", type=Path, default=DEFAULT_STORAGE)
    parser.add_argument(
        "--devices",
        default=",".join(str(n) for n in FLEETS),
        help="comma-separated fleet sizes (default 1, 10 and 50 million)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override an assumption (see Assumptions in scripts/sizing.py)",
    )
    args = parser.parse_args()
    try:
        fleets = [int(float(text)) for text in args.devices.split(",") if text]
        assumptions = replace(Assumptions(), **parse_overrides(args.set))  # type: ignore[arg-type]
        bench = json.loads(args.bench.read_text())
        cpu = cpu_basis(bench, _shown(args.bench), args.shape, args.drainer)
        storage = storage_basis(json.loads(args.storage.read_text()), _shown(args.storage))
        sizes = [size_fleet(devices, cpu, storage, assumptions) for devices in fleets]
    except (SizingError, ValueError, OSError) as error:
        parser.exit(2, f"sizing: {error}\n")
    print(markdown_table(sizes))
    print()
    print(growth_table(sizes, assumptions))
    print()
    print(basis_table(cpu, storage))


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    main()

"""Ingestion benchmark against the real broker and database (see docs/benchmarks.md).

    .venv/bin/python -m scripts.bench [--runs 3] [--quick] [--shapes steady --devices N --rounds N]

Needs KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL (`bash scripts/bench.sh` starts local services
when they are not set). Every run uses fresh topics, a fresh consumer group and a fresh,
migrated database, and removes them afterwards.

The code under test is copied once at start (worker/, schemas/, sql/ of the working tree, or
of `--git-ref REF`) to .local/bench-code, so every run measures the same code even while the
working tree changes; the commit and any uncommitted changes are recorded in the JSON.

Per fleet shape ("live", "backlog", "first_sighting", "steady"; see shapes.py) and run:
  0. (steady only, not timed) produce the fleet's installs and let the worker and the peer
     store them, each in its own group; the reader's group is moved past them;
  1. produce the shape's timed messages into fresh topics;
  2. (a) read limit: a bare aiokafka consumer (built by `worker.kafka.clients.create_consumer`,
     so the same fetch settings, and `getmany` with the worker's `batch_max_records`) reads
     every message from a fresh group, without decoding them;
     (a2) the same, plus the worker's own decoding and folding of each batch (no database);
     (a3) the worker's write path alone (`IngestionLoop._store` on pre-folded batches, into
     a fresh database; no Kafka); (a4) the CPU ceiling: the machine's cores divided by the
     CPU one event costs in (a2) and (a3), broker and Postgres included (`--skip-stages`
     skips a2-a4; the steady shape has none: its fleet is stored beforehand);
  3. (b) drain: the real worker (`python -m worker.cli run`, a subprocess) consumes the same
     pre-filled topics into Postgres; the rate is measured from the first progress the worker
     stored to the moment every offset is committed in Kafka (start-up excluded; the rate with
     start-up included is reported too);
  4. (c) ratio (b)/(a);
  5. (p) the peer, the minimal pipeline (peer.py: getmany, orjson, fold, one unnest upsert
     with GREATEST, commit), drains the same messages in its own group and table; the worker
     drains first in odd runs, the peer in even ones; (r) ratio (b)/(p); CPU-µs per event of
     each drainer's process and of Postgres.
Then (d) latency: the worker runs on fresh topics while a producer sends a live fleet's
heartbeats at a fixed rate (half the median steady drain rate, or live's) for
--latency-seconds; each message's latency is the time its offset was seen committed minus the
time it was handed to the producer. (e) The worker's peak RSS (process and children, sampled
every 100 ms) over every phase.

Results: a table on stdout and a JSON file (default .local/bench-results.json); worker logs
in .local/bench-logs. `--profile DIR` runs the drain workers under cProfile (or pyinstrument).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from scripts.bench import log
from scripts.bench.code_under_test import (
    CODE_DIR,
    LOG_DIR,
    REPO_ROOT,
    UnderTest,
    import_worker_modules,
    snapshot_code,
)
from scripts.bench.latency import measure_latency
from scripts.bench.peer import count_peer_devices, create_peer_table, measure_peer
from scripts.bench.report import (
    TARGETS,
    alternating_order,
    machine_info,
    median,
    print_table,
    shape_medians,
    shape_verdicts,
    verdict,
)
from scripts.bench.scenario import (
    Scenario,
    Services,
    commit_offsets,
    create_scenario,
    drop_scenario,
    end_offsets,
    produce_messages,
    produce_workload,
)
from scripts.bench.shapes import Workload, build_workload, full_shapes, quick_shapes
from scripts.bench.stages import (
    cpu_ceiling,
    measure_decode_limit,
    measure_read_limit,
    measure_write_limit,
)
from scripts.bench.workers import measure_drain, store_beforehand


async def measure_shape_run(
    services: Services, args: argparse.Namespace, name: str, workload: Workload, run: int
) -> dict[str, Any]:
    """One run of one shape in fresh topics and a fresh database: the fleet stored beforehand
    (if the shape has one, not timed), then (a) the read limit, the stage limits, and the
    worker's drain (b) and the peer's (p) in alternating order (worker first in odd runs)."""
    log_dir = LOG_DIR
    scenario = await create_scenario(services, args.partitions)
    try:
        await create_peer_table(scenario.database_url)
        if workload.stored_beforehand:
            await store_fleet_beforehand(services, scenario, workload, name, run)
        produce_seconds = await produce_workload(services, scenario, workload)
        log(f"{name} run {run}: produced {workload.total:,} in {produce_seconds:.1f} s; reading")
        limit_seconds = max(120.0, workload.total / 1_000)
        reader_settings = scenario.worker_settings(services, scenario.reader_group)
        read = await measure_read_limit(reader_settings, workload.total, limit_seconds)
        log(f"{name} run {run}: (a) read limit {read.events_per_second:,.0f} ev/s")
        stages: dict[str, Any] = {}
        # The stage limits read and write from the topics' start: not for a fleet stored
        # beforehand (the peer is the reference there).
        if args.stages and not workload.stored_beforehand:
            decode = await measure_decode_limit(services, scenario, workload.total, limit_seconds)
            write = await measure_write_limit(services, scenario, workload, limit_seconds)
            stages = {
                "decode": asdict(decode),
                "write": asdict(write),
                "cpu_ceiling_events_per_second": cpu_ceiling(decode, write),
            }
            log(
                f"{name} run {run}: (a2) read + decode + fold limit "
                f"{decode.events_per_second:,.0f} ev/s; (a3) write limit "
                f"{write.events_per_second:,.0f} ev/s, cores {write.extra['cores_used']}; "
                f"(a4) CPU ceiling {stages['cpu_ceiling_events_per_second']:,.0f} ev/s"
            )
        order = alternating_order(run)
        measured: dict[str, Any] = {}
        for who in order:
            if who == "worker":
                log(f"{name} run {run}: starting the worker")
                extension = "pyisession" if args.profiler == "pyinstrument" else "prof"
                profile = args.profile / f"{name}-{run}.{extension}" if args.profile else None
                measured["worker"] = await measure_drain(
                    services,
                    scenario,
                    workload,
                    log_dir / f"{name}-{run}.log",
                    profile,
                    limit_seconds,
                    args.workers,
                )
            else:
                log(f"{name} run {run}: starting the peer")
                measured["peer"] = await measure_peer(
                    services,
                    scenario,
                    workload.total,
                    limit_seconds,
                    log_dir / f"{name}-{run}-peer.log",
                )
        peer_devices = await count_peer_devices(scenario.database_url)
    finally:
        if not args.keep:
            await drop_scenario(services, scenario)
    if peer_devices != workload.devices:
        raise RuntimeError(f"the peer stored {peer_devices} devices, not {workload.devices}")
    drain, peak = measured["worker"]
    peer, peer_peak = measured["peer"]
    ratio = drain.events_per_second / read.events_per_second
    ratio_to_peer = drain.events_per_second / peer.events_per_second
    log(
        f"{name} run {run}: (b) drain {drain.events_per_second:,.0f} ev/s "
        f"({drain.events_per_second_with_startup:,.0f} incl. {drain.startup_seconds:.1f} s "
        f"start-up), ratio {ratio:.2f}, peak RSS {peak:.0f} MB, cores "
        f"{drain.extra['cores_used']}"
    )
    log(
        f"{name} run {run}: (p) peer {peer.events_per_second:,.0f} ev/s, cores "
        f"{peer.extra['cores_used']}; worker / peer {ratio_to_peer:.2f}"
    )
    return {
        "run": run,
        "messages": workload.total,
        "produce_seconds": round(produce_seconds, 2),
        "order": list(order),
        "read": asdict(read),
        **stages,
        "drain": asdict(drain),
        "peer": asdict(peer),
        "ratio": ratio,
        "ratio_to_peer": ratio_to_peer,
        "peer_to_read": peer.events_per_second / read.events_per_second,
        "peak_rss_mb": peak,
        "peer_peak_rss_mb": peer_peak,
    }


async def store_fleet_beforehand(
    services: Services, scenario: Scenario, workload: Workload, name: str, run: int
) -> None:
    """Not timed: the fleet's installs are produced, and stored by the worker and by the peer
    (each in its own group, which then resumes after them); the reader's group is moved past
    them."""
    stored = workload.stored_beforehand
    await produce_messages(services, scenario, stored, [], len(stored))
    limit_seconds = max(300.0, len(stored) / 500)
    seconds = await store_beforehand(
        services, scenario, len(stored), LOG_DIR / f"{name}-{run}-beforehand.log", limit_seconds
    )
    await measure_peer(
        services,
        scenario,
        len(stored),
        limit_seconds,
        LOG_DIR / f"{name}-{run}-peer-beforehand.log",
    )
    await commit_offsets(services, scenario.reader_group, await end_offsets(services, scenario))
    log(f"{name} run {run}: {len(stored):,} devices stored beforehand in {seconds:.0f} s")


async def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    kafka = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    database = os.environ.get("DATABASE_URL")
    if not kafka or not database:
        raise SystemExit(
            "KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL must be set (or run: bash scripts/bench.sh)"
        )
    services = Services(kafka, database)
    # The worker modules log through structlog (e.g. migrations): keep it to warnings, on stderr.
    UnderTest.configure_logging("warning", "console")
    size = {
        key: value
        for key, value in (("devices", args.devices), ("rounds", args.rounds))
        if value is not None
    }
    shapes = quick_shapes(**size) if args.quick else full_shapes(**size)
    wanted = [name for name in args.shapes.split(",") if name]
    latency_seconds = args.latency_seconds or (5.0 if args.quick else 20.0)
    log_dir = LOG_DIR

    connection = await asyncpg.connect(services.database_url_for("postgres"))
    try:
        postgres_version = await connection.fetchval("SHOW server_version")
    finally:
        await connection.close()
    reference = UnderTest.Settings(kafka_bootstrap_servers=kafka, database_url=database)
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m scripts.bench", *sys.argv[1:]]),
        "quick": args.quick,
        "runs": args.runs,
        "partitions": args.partitions,
        "workers": args.workers,
        "machine": machine_info(services, postgres_version),
        "worker_settings": {
            key: value
            for key, value in reference.masked().items()
            if key.startswith(("batch_", "database_pool", "max_message"))
        },
        "targets": TARGETS,
        "shapes": {},
        "peak_rss_mb_by_run": [],
    }
    began = time.perf_counter()
    now = datetime.now(UTC).replace(microsecond=0)

    for name in wanted:
        shape = shapes[name]
        log(f"{name}: building {shape.describe()}")
        workload = build_workload(shape, now)
        log(
            f"{name}: {workload.total:,} messages "
            f"({len(workload.lifecycle):,} lifecycle, {len(workload.heartbeats):,} heartbeats)"
        )
        runs = [
            await measure_shape_run(services, args, name, workload, run)
            for run in range(1, args.runs + 1)
        ]
        results["peak_rss_mb_by_run"] += [measured["peak_rss_mb"] for measured in runs]
        results["shapes"][name] = {
            "description": shape.describe(),
            "shape": asdict(shape),
            "messages": workload.total,
            "stored_beforehand": len(workload.stored_beforehand),
            "runs": runs,
            "median": shape_medians(runs),
        }
        del workload

    if not args.skip_latency:
        rate = args.latency_rate
        if rate is None:
            # Half the steady state's maximum rate (issue #17), or of the live shape's.
            basis = results["shapes"].get("steady") or results["shapes"].get("live")
            if basis is None:
                raise SystemExit("--latency-rate is needed when neither steady nor live is run")
            rate = basis["median"]["drain_events_per_second"] / 2
        live_shape = shapes["live"]
        fleet = UnderTest.build_fleet(live_shape.customers, live_shape.devices_per_customer, seed=3)
        latency_runs = []
        for run in range(1, args.runs + 1):
            scenario = await create_scenario(services, args.partitions)
            try:
                log(
                    f"latency run {run}: {len(fleet):,} devices at {rate:,.0f} ev/s "
                    f"for {latency_seconds:.0f} s"
                )
                result = await measure_latency(
                    services, scenario, fleet, rate, latency_seconds, log_dir / f"latency-{run}.log"
                )
            finally:
                if not args.keep:
                    await drop_scenario(services, scenario)
            log(
                f"latency run {run}: p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, "
                f"max {result.max_ms:.1f} ms (achieved {result.achieved_rate:,.0f} ev/s), "
                f"{result.worker_batches} batches of {result.mean_batch} msgs, "
                f"{result.mean_write_ms} ms write each, "
                f"peak RSS {result.peak_rss_mb:.0f} MB, cores {result.cores_used}"
            )
            latency_runs.append(asdict(result))
            results["peak_rss_mb_by_run"].append(result.peak_rss_mb)
        results["latency"] = {
            "rate": rate,
            "seconds": latency_seconds,
            "devices": len(fleet),
            "runs": latency_runs,
            "median": {
                key: median(r[key] for r in latency_runs)
                for key in (
                    "p50_ms",
                    "p90_ms",
                    "p99_ms",
                    "max_ms",
                    "stored_p50_ms",
                    "stored_p99_ms",
                    "achieved_rate",
                )
            },
        }

    results["peak_rss_mb"] = max(results["peak_rss_mb_by_run"], default=float("nan"))
    results["total_seconds"] = round(time.perf_counter() - began, 1)
    results["verdicts"] = shape_verdicts(results["shapes"])
    if "latency" in results:
        results["verdicts"]["latency_p99_ms"] = verdict(
            results["latency"]["median"]["p99_ms"], TARGETS["latency_p99_ms"], False
        )
    results["verdicts"]["peak_rss_mb"] = verdict(
        results["peak_rss_mb"], TARGETS["peak_rss_mb"], False
    )
    if "live" in results["shapes"]:
        results["verdicts"]["live_license_events_per_device"] = verdict(
            results["shapes"]["live"]["median"]["license_events_per_device"],
            TARGETS["live_license_events_per_device"],
            False,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=None,
        help="runs of each measurement (default 3; 1 with --quick)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small smoke version (about 2 minutes)"
    )
    parser.add_argument(
        "--shapes",
        default="live,backlog,first_sighting,steady",
        help="comma-separated: live,backlog,first_sighting,steady",
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=None,
        help="devices of the steady shape, stored beforehand (default 200,000; quick 5,000)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="heartbeat rounds of the steady shape, 5 minutes apart (default 12; quick 3)",
    )
    parser.add_argument("--partitions", type=int, default=4, help="partitions per topic")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes draining together in one group (replicas on this machine)",
    )
    parser.add_argument(
        "--latency-seconds",
        type=float,
        default=None,
        help="length of the fixed-rate phase (default 20, quick 5)",
    )
    parser.add_argument(
        "--latency-rate",
        type=float,
        default=None,
        help="events/s for the latency phase (default: half the live drain median)",
    )
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument(
        "--skip-stages",
        action="store_true",
        help="skip the decode (a2) and write (a3) limits",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="JSON result file (default .local/bench-results.json; "
        ".local/bench-results-quick.json with --quick)",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="run the drain workers under a profiler, writing DIR/<shape>-<run>.*",
    )
    parser.add_argument("--profiler", choices=("cprofile", "pyinstrument"), default="cprofile")
    parser.add_argument("--keep", action="store_true", help="keep topics and databases")
    parser.add_argument(
        "--git-ref",
        default=None,
        help="benchmark this commit's worker instead of the working tree (e.g. HEAD)",
    )
    args = parser.parse_args()
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.output is None:
        name = "bench-results-quick.json" if args.quick else "bench-results.json"
        args.output = str(REPO_ROOT / ".local" / name)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    for option in ("devices", "rounds"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1")
    unknown = set(filter(None, args.shapes.split(","))) - set(full_shapes())
    if unknown:
        parser.error(f"unknown shapes: {', '.join(sorted(unknown))}")
    args.stages = not args.skip_stages

    LOG_DIR.mkdir(parents=True, exist_ok=True)
    for old in LOG_DIR.glob("*.log"):
        old.unlink()
    if args.profile:
        args.profile = Path(args.profile).resolve()
        args.profile.mkdir(parents=True, exist_ok=True)
    code = snapshot_code(CODE_DIR, args.git_ref)
    import_worker_modules(CODE_DIR)
    log(
        f"benchmarking the {code['source']} at {code['commit'][:12]}"
        + (
            f" with {len(code['uncommitted_changes'])} uncommitted change(s)"
            if code["uncommitted_changes"]
            else ""
        )
    )
    results = asyncio.run(run_benchmark(args))
    results["code"] = code
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print_table(results)
    print(f"total time {results['total_seconds']:.0f} s; results written to {output}")
    if args.quick:
        print("(--quick: small sizes, one run; the figures are not comparable with the targets)")

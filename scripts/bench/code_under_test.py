"""The code under test: a snapshot of the worker's code, and the worker's names the benchmark
uses, imported from that snapshot so its reader, settings and simulated fleet match the worker
it starts."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

REPO_ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT_PATHS = ("worker", "schemas", "sql")
# BENCH_WORK_DIR moves the snapshot and the logs (the tests run the benchmark in a directory
# of their own, so they never disturb a benchmark in progress).
WORK_DIR = Path(os.environ.get("BENCH_WORK_DIR", REPO_ROOT / ".local"))
CODE_DIR = WORK_DIR / "bench-code"  # the snapshot of the code under test
LOG_DIR = WORK_DIR / "bench-logs"  # one worker log per run


# A simulated fleet's signals in order: (device, when) pairs.
SignalOrder = Callable[[list[Any], int, datetime, timedelta], Iterator[tuple[Any, datetime]]]


class UnderTest:
    """The worker's names, set by `import_worker_modules()` from the snapshot (the only place
    the benchmark imports the worker), typed as the benchmark uses them."""

    # Its settings and Kafka consumer, as the worker builds them; its logging.
    Settings: ClassVar[Callable[..., Any]]
    create_consumer: ClassVar[Callable[[Any], Any]]
    configure_logging: ClassVar[Callable[[str, str], None]]
    # The simulated fleet (worker.sim.fleet) and its encoded events.
    build_fleet: ClassVar[Callable[..., list[Any]]]
    agent_event: ClassVar[Callable[[Any, str, datetime], dict[str, Any]]]
    encode: ClassVar[Callable[[dict[str, Any]], bytes]]
    heartbeat_rounds: ClassVar[SignalOrder]
    device_bursts: ClassVar[SignalOrder]
    # For the stage limits (a2) and (a3): the worker's own decoding, folding and write path.
    decode_batch: ClassVar[Callable[[Mapping[Any, Any], int], Any]]
    coalesce: ClassVar[Callable[[Iterable[Any], datetime, timedelta], Any]]
    IngestionLoop: ClassVar[Callable[..., Any]]
    Repository: ClassVar[Any]  # its `connect` opens the pool
    SystemClock: ClassVar[Callable[[], Any]]
    # The collector thresholds the worker sets (None: the snapshot sets none).
    gc_thresholds: ClassVar[tuple[int, ...] | None] = None


def snapshot_code(destination: Path, git_ref: str | None) -> dict[str, Any]:
    """Copies the worker's code (the working tree, or a git ref) to `destination`: every run
    then measures the same code even while the working tree is being edited."""
    if destination.exists():
        shutil.rmtree(destination)
    destination.mkdir(parents=True)
    if git_ref:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", git_ref, *SNAPSHOT_PATHS],
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(destination)], input=archive, check=True)
    else:
        for name in SNAPSHOT_PATHS:
            shutil.copytree(
                REPO_ROOT / name,
                destination / name,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            )

    def git(*arguments: str) -> str:
        result = subprocess.run(
            ["git", *arguments], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )
        return result.stdout.strip()

    return {
        "source": f"git {git_ref}" if git_ref else "working tree",
        "commit": git("rev-parse", git_ref or "HEAD"),
        "uncommitted_changes": []
        if git_ref
        else git("status", "--porcelain", "--", *SNAPSHOT_PATHS).splitlines(),
        "snapshot_dir": str(destination),
    }


def _worker_module(current: str, flat: str) -> Any:
    try:
        return importlib.import_module(f"worker.{current}")
    except ModuleNotFoundError:
        return importlib.import_module(f"worker.{flat}")


def _ingestion_loop(ingest: Any) -> Callable[..., Any]:
    """The agent loop, built from the benchmark's keyword arguments (settings, consumer,
    producer, repository, clock, stopping): through the consumer session it composes where
    the snapshot has one, directly in snapshots from before."""
    session = getattr(ingest, "ConsumerSession", None)
    if session is None:
        return ingest.IngestionLoop  # type: ignore[no-any-return]
    return lambda **parts: ingest.IngestionLoop(session(beat=lambda: None, task="bench", **parts))


def import_worker_modules(snapshot: Path) -> None:
    sys.path.insert(0, str(snapshot))
    # The package layout of the commit under test: subpackages, or the flat one of commits
    # before it (a baseline run of an older --git-ref).
    batch = _worker_module("ingest.batch", "batch")
    clock = _worker_module("clock", "clock")
    ingest = _worker_module("ingest.loop", "ingest")
    kafka_clients = _worker_module("kafka.clients", "kafka_clients")
    logs = _worker_module("ops.logs", "logs")
    repository = _worker_module("db.repository", "repository")
    service = _worker_module("service", "service")
    settings = _worker_module("settings", "settings")
    simulator = _worker_module("sim.fleet", "simulator")
    folding = _worker_module("ingest.coalesce", "coalesce")

    UnderTest.Settings = settings.Settings
    UnderTest.create_consumer = kafka_clients.create_consumer
    UnderTest.configure_logging = logs.configure_logging
    UnderTest.agent_event, UnderTest.build_fleet = simulator.agent_event, simulator.build_fleet
    UnderTest.device_bursts, UnderTest.encode = simulator.device_bursts, simulator.encode
    UnderTest.heartbeat_rounds = simulator.heartbeat_rounds
    UnderTest.decode_batch, UnderTest.coalesce = batch.decode_batch, folding.coalesce
    UnderTest.IngestionLoop = _ingestion_loop(ingest)
    UnderTest.Repository = repository.Repository
    UnderTest.SystemClock = clock.SystemClock
    young = getattr(service, "YOUNG_COLLECTION_THRESHOLD", None)
    older = getattr(service, "OLDER_COLLECTION_THRESHOLDS", None)
    UnderTest.gc_thresholds = (young, *older) if young and older else None
    loaded_from = Path(sys.modules["worker"].__file__ or "").resolve()
    if snapshot.resolve() not in loaded_from.parents:
        raise RuntimeError(f"worker modules came from {loaded_from}, not from {snapshot}")

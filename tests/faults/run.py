"""`make faults`: the full fault suite, with a figures table; exit 1 on any violation.

    python -m tests.faults.run --events 200000 --sigkills 22 --postgres-restarts 3 \
        --broker-restarts 2

Uses the services named by KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL (a superuser's) and
LOCAL_SERVICES_DIR when all three are set; otherwise starts its own with
deploy/local/services.sh in .local/fault-services and stops them afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.faults.harness import SuiteConfig, SuiteResult, run_fault_suite
from tests.faults.stream import Poison
from tests.support import REPO_ROOT, SecureKafka, Services, local_services


def main(argv: list[str] | None = None) -> int:
    options = _parser().parse_args(argv)
    work_dir = Path(options.work_dir or tempfile.mkdtemp(prefix="license-faults-"))
    config = SuiteConfig(
        work_dir=work_dir,
        events=options.events,
        seed=options.seed,
        replicas=options.replicas,
        sigkills=options.sigkills,
        postgres_restarts=options.postgres_restarts,
        broker_restarts=options.broker_restarts,
        poison=tuple(Poison) if not options.no_oversized else _without_oversized(),
        produce_seconds=options.produce_seconds or max(60.0, options.events / 400),
        keep_database=options.keep_database,
    )
    with _services() as services:
        result = asyncio.run(run_fault_suite(services, config))
    _print(result, work_dir)
    return 0 if result.passed else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.run", description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=20261203)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--sigkills", type=int, default=22)
    parser.add_argument("--postgres-restarts", type=int, default=3)
    parser.add_argument("--broker-restarts", type=int, default=2)
    parser.add_argument(
        "--produce-seconds", type=float, default=0, help="spread production over this long"
    )
    parser.add_argument(
        "--no-oversized", action="store_true", help="leave out the ~1 MB poison message"
    )
    parser.add_argument("--keep-database", action="store_true")
    parser.add_argument("--work-dir", help="replica logs (default: a new temporary directory)")
    return parser


def _without_oversized() -> tuple[Poison, ...]:
    return tuple(poison for poison in Poison if poison is not Poison.OVERSIZED)


@contextlib.contextmanager
def _services() -> Iterator[Services]:
    kafka, database = os.environ.get("KAFKA_BOOTSTRAP_SERVERS"), os.environ.get("DATABASE_URL")
    state_dir = os.environ.get("LOCAL_SERVICES_DIR")
    if kafka and database and state_dir:
        path = Path(state_dir)
        yield Services(kafka, database, state_dir=path, secure=SecureKafka.from_state_dir(path))
        return
    with local_services(REPO_ROOT / ".local" / "fault-services", clean=True) as services:
        yield services


def _print(result: SuiteResult, work_dir: Path) -> None:
    print(result.figures.table())
    print(f"replica logs: {work_dir}")
    if result.kept_database:
        print(f"database kept: {result.database_url}")
    if result.passed:
        print("every invariant holds")
    else:
        print("INVARIANTS VIOLATED:", file=sys.stderr)
        print(result.failure_report(), file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())

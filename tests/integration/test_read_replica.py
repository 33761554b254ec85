"""Reports off the primary (issue #15, part 6): with READ_DATABASE_URL set, `report usage`
and `reconcile` (both modes) read from it, a real streaming replica made with
`pg_basebackup -R` from the tests' Postgres (tests/integration/replica.py); commands that
write never use it. The primary is made unreachable for the reading commands (DATABASE_URL on
a closed port), so their success shows which server they read."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from datetime import UTC, timedelta
from typing import Any

import orjson
import pytest

from tests.integration.license_support import (
    ALICE_DEVICES,
    KIOSK,
    day,
    ingest,
    publish_outbox,
    send,
    sweep,
)
from tests.integration.replica import Replica, closed_port_url, streaming_replica
from tests.support import Services, make_settings, run_cli, settings_environment
from worker.failures import ExitCode
from worker.settings import Settings

pytestmark = pytest.mark.integration

DECIDED = day(0) + timedelta(minutes=1)


@pytest.fixture(scope="module")
def replica(services: Services) -> Iterator[Replica]:
    with streaming_replica(services.admin_url()) as started:
        yield started


@pytest.fixture
def settings(services: Services, database_url: str, topics: dict[str, str]) -> Settings:
    return make_settings(services, database_url, topics, sweep_enabled=False, relay_enabled=False)


async def _ingest_day_0(services: Services, settings: Settings) -> None:
    installs = [(d, "install", day(0)) for d in [*ALICE_DEVICES, KIOSK]]
    await ingest(services, settings, DECIDED, await send(services, settings, installs))


def _environment(settings: Settings, *, primary: str, read: str) -> dict[str, str]:
    environment = settings_environment(settings)
    environment["DATABASE_URL"] = primary
    environment["READ_DATABASE_URL"] = read
    return environment


async def _cli(environment: dict[str, str], *arguments: str) -> tuple[int, str, str]:
    done = await asyncio.to_thread(run_cli, environment, *arguments)
    return done.returncode, done.stdout, done.stderr


def _log_events(stderr: str, event: str) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == event]


async def test_the_report_reads_what_the_worker_wrote_from_the_replica(
    services: Services, database_url: str, settings: Settings, replica: Replica
) -> None:
    await _ingest_day_0(services, settings)
    await replica.caught_up()
    environment = _environment(
        settings,
        primary=closed_port_url(database_url),
        read=replica.url_for(services.reporter_url(database_url)),
    )
    status, out, err = await _cli(
        environment, "report", "usage", "--customer", "acme", "--format", "json"
    )
    assert status == 0, err
    assert '"kiosk-1"' in out
    assert '"alice-watch"' in out
    [read_from] = _log_events(err, "database.read_replica")
    assert read_from["in_recovery"] is True
    assert read_from["variable"] == "READ_DATABASE_URL"
    # Autovacuum on the primary may be streaming at this instant: a bool, not necessarily true.
    assert isinstance(read_from["replay_caught_up"], bool)
    assert isinstance(read_from["replay_lag_seconds"], float)
    assert read_from["replay_lag_seconds"] >= 0


async def test_reconcile_both_modes_read_the_replica(
    services: Services, database_url: str, settings: Settings, replica: Replica
) -> None:
    await _ingest_day_0(services, settings)
    await publish_outbox(settings)
    await sweep(settings, day(1) + timedelta(minutes=1))  # a usage snapshot
    await replica.caught_up()
    # reconcile reads the outbox and the usage snapshots: the worker role's reads (on a
    # replica it can write nothing).
    environment = _environment(
        settings, primary=closed_port_url(database_url), read=replica.url_for(database_url)
    )
    first = DECIDED.astimezone(UTC).date().isoformat()
    last = (day(2)).astimezone(UTC).date().isoformat()
    status, out, err = await _cli(environment, "reconcile", "--from", first, "--to", last)
    assert status == 0, err
    assert "no difference" in out
    assert "(1 snapshots)" in out
    [read_from] = _log_events(err, "database.read_replica")
    assert read_from["in_recovery"] is True
    status, out, err = await _cli(environment, "reconcile", "--customer", "acme")
    assert status == 0, err
    assert "billing's view agrees with the database" in out
    assert "0 subjects" not in out
    assert _log_events(err, "database.read_replica")[0]["in_recovery"] is True


async def test_an_unreachable_read_database_fails_naming_it_without_falling_back(
    services: Services, database_url: str, settings: Settings
) -> None:
    environment = _environment(
        settings,
        primary=services.reporter_url(database_url),
        read=closed_port_url(services.reporter_url(database_url)),
    )
    status, out, err = await _cli(environment, "report", "usage", "--format", "json")
    assert status == ExitCode.UNREACHABLE, err
    assert "(READ_DATABASE_URL)" in err
    assert "reporter-test-password" not in err
    assert out == ""


async def test_a_read_database_that_is_no_replica_is_read_with_a_warning(
    services: Services, database_url: str, settings: Settings
) -> None:
    """READ_DATABASE_URL on the primary itself: the report runs, and says the snapshot is
    held on a server that is not in recovery."""
    environment = _environment(
        settings,
        primary=closed_port_url(database_url),
        read=services.reporter_url(database_url),
    )
    status, _, err = await _cli(environment, "report", "usage", "--format", "json")
    assert status == 0, err
    [read_from] = _log_events(err, "database.read_replica")
    assert read_from["in_recovery"] is False
    assert read_from["level"] == "warning"


async def test_commands_that_write_never_use_the_read_database(
    services: Services, database_url: str, settings: Settings
) -> None:
    await _ingest_day_0(services, settings)
    environment = _environment(
        settings, primary=database_url, read=closed_port_url(services.reporter_url(database_url))
    )
    status, out, err = await _cli(environment, "publish-events")
    assert status == 0, err
    assert "published 0 license events" not in out
    assert "published" in out
    assert _log_events(err, "database.read_replica") == []


async def test_a_refused_login_on_the_read_database_names_its_variables(
    services: Services, database_url: str, settings: Settings
) -> None:
    wrong = services.reporter_url(database_url).replace("reporter-test-password", "wrong-pw")
    environment = _environment(settings, primary=services.reporter_url(database_url), read=wrong)
    status, out, err = await _cli(environment, "report", "usage", "--format", "json")
    assert status == ExitCode.ERROR, err
    assert "READ_DATABASE_URL" in err
    assert "READ_DATABASE_PASSWORD_FILE" in err
    assert re.search(r"(?<!READ_)DATABASE_", err) is None  # not the primary's variables
    assert "wrong-pw" not in err
    assert out == ""

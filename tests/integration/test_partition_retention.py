"""Monthly partitions of license_history, device_lifecycle_events and usage_snapshots
(migration 0015, issue #15 part 3): created ahead of the sweeper's (settable) clock, dropped
whole once past their retention, the history's last state per subject kept for the as-of
report, nothing lost when a row's month has no partition, and only through the SECURITY
DEFINER function, which takes no other table and no hostile argument. Real Postgres."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from structlog.testing import capture_logs

from tests.integration.license_support import sweep
from tests.support import (
    ROLES,
    Services,
    fetch,
    fetchval,
    make_settings,
    run_cli,
    settings_environment,
)
from worker.db.repository import Repository
from worker.db.sql_files import load_migrations
from worker.licensing.partitions import maintain_partitions
from worker.settings import Settings

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC)
MAINTAIN = "SELECT * FROM maintain_partitions($1::text, $2::timestamptz, $3::interval, $4::integer)"


def month_start(months_back: int) -> datetime:
    """The first instant (UTC) of the month `months_back` months before this one (negative:
    ahead)."""
    index = NOW.year * 12 + NOW.month - 1 - months_back
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def in_month(months_back: int) -> datetime:
    return month_start(months_back) + timedelta(days=10)


def partition(table: str, months_back: int) -> str:
    return f"{table}_p{month_start(months_back):%Y%m}"


@pytest.fixture
def settings(services: Services, database_url: str, topics: dict[str, str]) -> Settings:
    return make_settings(
        services,
        database_url,
        topics,
        relay_enabled=False,
        license_history_retention_months=25,
        lifecycle_events_retention_months=13,
        usage_snapshots_retention_months=25,
        partition_months_ahead=3,
    )


async def partitions(url: str, table: str) -> set[str]:
    rows = await fetch(
        url,
        "SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = $1::regclass",
        table,
    )
    return {row["relname"] for row in rows}


async def maintain(settings: Settings, at: datetime) -> dict[str, tuple[int, int, int, int]]:
    repository = await Repository.connect(settings.database_url.get_secret_value(), 1)
    try:
        changes = await maintain_partitions(repository, settings, at)
    finally:
        await repository.close()
    return {c.table: (c.created, c.dropped, c.moved, c.deleted) for c in changes}


async def add_history(url: str, subject: str, change: str, decided_at: datetime) -> None:
    await fetch(
        url,
        "INSERT INTO license_history (customer_id, subject_type, subject_id, change, basis, "
        "effective_at, decided_at) VALUES ('acme', 'device', $1, $2, 'unassigned', $3, $3)",
        subject,
        change,
        decided_at,
    )


async def add_customer_and_device(url: str) -> None:
    await fetch(url, "INSERT INTO customers (customer_id) VALUES ('acme') ON CONFLICT DO NOTHING")
    await fetch(
        url,
        "INSERT INTO devices (customer_id, device_id, first_seen_at, last_seen_at) "
        "VALUES ('acme', 'd1', now(), now()) ON CONFLICT DO NOTHING",
    )


async def add_lifecycle_event(url: str, event_id: str, occurred_at: datetime) -> list[str]:
    """Through ingestion's own statement: the ids it reports as newly stored."""
    repository = await Repository.connect(url, 1)
    try:
        rows = await repository.fetch(
            "insert_lifecycle_events", ["acme"], [event_id], ["d1"], ["install"], [occurred_at]
        )
    finally:
        await repository.close()
    return [row["event_id"] for row in rows]


async def test_the_sweeper_creates_partitions_ahead_of_its_clock(settings: Settings) -> None:
    url = settings.database_url.get_secret_value()
    further = settings.model_copy(update={"partition_months_ahead": 6})
    assert partition("license_history", -6) not in await partitions(url, "license_history")

    with capture_logs() as logs:
        await sweep(further, NOW)

    for table in ("license_history", "device_lifecycle_events", "usage_snapshots"):
        months = await partitions(url, table)
        assert {partition(table, -ahead) for ahead in range(7)} <= months
        assert f"{table}_default" in months
    maintained = [entry for entry in logs if entry["event"] == "sweep.partitions_maintained"]
    assert {entry["table"] for entry in maintained} == {
        "license_history",
        "device_lifecycle_events",
        "usage_snapshots",
    }
    assert all(entry["created"] >= 3 for entry in maintained)
    # Idempotent: a second pass creates nothing.
    assert await maintain(further, NOW) == {
        "license_history": (0, 0, 0, 0),
        "device_lifecycle_events": (0, 0, 0, 0),
        "usage_snapshots": (0, 0, 0, 0),
    }


async def test_partitions_past_the_retention_are_dropped_whole_and_the_rest_stays(
    services: Services, settings: Settings
) -> None:
    url = settings.database_url.get_secret_value()
    superuser = services.superuser_url(url)
    await add_customer_and_device(superuser)
    # History: d-old allocated 30 months ago, never changed since; d-gone allocated then
    # released 26 months ago; d-edge in the last month kept; d-new now.
    await add_history(superuser, "d-old", "allocated", in_month(30))
    await add_history(superuser, "d-gone", "allocated", in_month(27))
    await add_history(superuser, "d-gone", "released", in_month(26))
    await add_history(superuser, "d-edge", "allocated", in_month(25))
    await add_history(superuser, "d-recent", "allocated", in_month(2))
    await add_history(superuser, "d-new", "allocated", NOW)
    for event_id, months in (("e-old", 14), ("e-kept", 12)):
        assert await add_lifecycle_event(url, event_id, in_month(months)) == [event_id]
    await fetch(
        superuser,
        "INSERT INTO usage_snapshots (customer_id, day, event_id, taken_at) VALUES "
        "('acme', $1, gen_random_uuid(), now()), ('acme', $2, gen_random_uuid(), now())",
        in_month(26).date(),
        in_month(1).date(),
    )
    # Months without a partition yet (the template was migrated this month): kept in the
    # default partition, nothing lost.
    assert await fetchval(superuser, "SELECT count(*) FROM license_history_default") == 5

    # Ten months ago (the sweeper's clock): everything is within the retention; the old
    # months get partitions, their rows moved out of the default partition.
    earlier = await maintain(settings, in_month(10))
    assert earlier["license_history"][1:] == (0, 4, 0)  # d-old, d-gone twice, d-edge
    history_months = await partitions(url, "license_history")
    assert {partition("license_history", m) for m in (30, 27, 26, 25)} <= history_months
    assert await fetchval(url, "SELECT count(*) FROM license_history") == 6

    # Now: 25 months of history, 13 of lifecycle events, 25 of snapshots are kept.
    now = await maintain(settings, NOW)
    assert now["license_history"][1] == 3  # the months 30, 27 and 26 back, dropped whole
    assert now["license_history"][3] == 0  # no row deleted one by one
    history_months = await partitions(url, "license_history")
    assert not {partition("license_history", m) for m in (30, 27, 26)} & history_months
    assert partition("license_history", 25) in history_months
    assert partition("license_history", 2) in history_months  # moved out of the default
    kept = await fetch(url, "SELECT subject_id FROM license_history ORDER BY subject_id")
    assert [row["subject_id"] for row in kept] == ["d-edge", "d-new", "d-recent"]
    # Each subject's latest change before the kept history, for the as-of report.
    baseline = await fetch(
        url, "SELECT subject_id, change FROM license_history_baseline ORDER BY subject_id"
    )
    assert [(row["subject_id"], row["change"]) for row in baseline] == [
        ("d-gone", "released"),
        ("d-old", "allocated"),
    ]
    assert await fetchval(
        url, "SELECT retained_from FROM partition_retention WHERE table_name = 'license_history'"
    ) == month_start(25)

    events = await fetch(url, "SELECT event_id FROM device_lifecycle_events")
    assert [row["event_id"] for row in events] == ["e-kept"]
    assert partition("device_lifecycle_events", 14) not in await partitions(
        url, "device_lifecycle_events"
    )
    days = await fetch(url, "SELECT day FROM usage_snapshots")
    assert [row["day"] for row in days] == [in_month(1).date()]


async def test_a_row_whose_month_has_no_partition_is_kept(
    services: Services, settings: Settings
) -> None:
    """A far-future server clock (history) or an agent clock reset to 1970 (lifecycle
    events): the default partition keeps the row; maintenance never drops it while it is
    not past the retention, and a redelivered event is still recognised."""
    url = settings.database_url.get_secret_value()
    superuser = services.superuser_url(url)
    await add_customer_and_device(superuser)
    far_future = datetime(2100, 6, 1, tzinfo=UTC)
    await add_history(url, "d-future", "allocated", far_future)  # as the worker role
    assert await add_lifecycle_event(url, "e-future", far_future) == ["e-future"]
    assert await add_lifecycle_event(url, "e-1970", datetime(1970, 1, 2, tzinfo=UTC)) == ["e-1970"]
    assert await fetchval(superuser, "SELECT count(*) FROM license_history_default") == 1

    await maintain(settings, NOW)

    assert (
        await fetchval(
            url, "SELECT count(*) FROM license_history WHERE decided_at = $1", far_future
        )
        == 1
    )
    assert [
        r["event_id"] for r in await fetch(url, "SELECT event_id FROM device_lifecycle_events")
    ] == ["e-future"]  # 1970 is past the 13 months: deleted from the default partition
    # Redelivered: the same time conflicts on the key; another (clamped) time is found by id.
    assert await add_lifecycle_event(url, "e-future", far_future) == []
    assert await add_lifecycle_event(url, "e-future", NOW) == []
    assert await fetchval(url, "SELECT count(*) FROM device_lifecycle_events") == 1


@pytest.mark.parametrize(
    ("parent", "retention", "months_ahead"),
    [
        ("devices", "25 months", 3),
        ("license_outbox", "25 months", 3),
        ("license_history_default", "25 months", 3),
        ("license_history_baseline", "25 months", 3),
        ("license_history; DROP TABLE devices", "25 months", 3),
        ("public.license_history", "25 months", 3),
        ("LICENSE_HISTORY", "25 months", 3),
        (None, "25 months", 3),
        ("license_history", "1 month", 3),
        ("license_history", "59 days", 3),
        ("license_history", "0", 3),
        ("license_history", "-25 months", 3),
        ("license_history", None, 3),
        ("license_history", "25 months", 0),
        ("license_history", "25 months", 25),
        ("license_history", "25 months", None),
    ],
)
async def test_the_function_refuses_any_other_table_and_a_short_retention(
    services: Services,
    database_url: str,
    parent: str | None,
    retention: str | None,
    months_ahead: int | None,
) -> None:
    superuser = services.superuser_url(database_url)
    await add_customer_and_device(superuser)
    await add_history(superuser, "d1", "allocated", in_month(1))
    before = {t: await partitions(superuser, t) for t in ("license_history", "usage_snapshots")}
    connection = await asyncpg.connect(database_url)
    try:
        await connection.set_type_codec(
            "interval", encoder=str, decoder=str, schema="pg_catalog", format="text"
        )
        with pytest.raises(asyncpg.InvalidParameterValueError):
            await connection.fetch(MAINTAIN, parent, NOW, retention, months_ahead)
    finally:
        await connection.close()
    assert await fetchval(superuser, "SELECT count(*) FROM license_history") == 1
    assert await fetchval(superuser, "SELECT to_regclass('devices') IS NOT NULL")
    assert {t: await partitions(superuser, t) for t in before} == before


async def test_a_clock_far_ahead_drops_no_more_than_the_databases_clock_allows(
    services: Services, database_url: str
) -> None:
    superuser = services.superuser_url(database_url)
    await add_customer_and_device(superuser)
    await add_history(superuser, "d1", "allocated", NOW)
    await add_history(superuser, "d2", "allocated", in_month(1))
    [row] = await fetch(
        database_url,
        MAINTAIN,
        "license_history",
        datetime(2200, 1, 1, tzinfo=UTC),
        timedelta(days=61),
        3,
    )
    assert row["dropped"] == 0
    assert await fetchval(database_url, "SELECT count(*) FROM license_history") == 2


async def test_the_worker_role_cannot_drop_or_delete_partitions_itself(
    services: Services, database_url: str
) -> None:
    superuser = services.superuser_url(database_url)
    await add_customer_and_device(superuser)
    await add_history(superuser, "d1", "allocated", NOW)
    this_month = partition("license_history", 0)
    for statement in (
        f"DROP TABLE {this_month}",
        f"ALTER TABLE license_history DETACH PARTITION {this_month}",
        f"DELETE FROM {this_month}",
        f"TRUNCATE {this_month}",
        f"SELECT * FROM {this_month}",
        "SELECT create_month_partition('license_history', date_trunc('month', now()))",
        "SELECT fold_into_license_history_baseline('license_history_default', now(), true)",
        "SELECT fold_into_license_history_baseline('licenses', now(), true)",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await fetch(database_url, statement)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await fetch(
            services.reporter_url(database_url),
            MAINTAIN,
            "license_history",
            NOW,
            timedelta(days=800),
            3,
        )
    assert await fetchval(superuser, "SELECT count(*) FROM license_history") == 1


async def test_a_refused_maintenance_never_stops_the_sweep(
    services: Services, settings: Settings
) -> None:
    """`create-roles` not run again after `migrate`: the sweep goes on and says why."""
    url = settings.database_url.get_secret_value()
    await fetch(
        services.superuser_url(url),
        "REVOKE EXECUTE ON FUNCTION maintain_partitions(text, timestamptz, interval, integer) "
        f"FROM {ROLES.worker}",
    )
    with capture_logs() as logs:
        report = await sweep(settings, NOW)
    assert report.ran
    events = [entry["event"] for entry in logs if entry["log_level"] == "error"]
    assert events == ["sweep.partitions_refused"]
    assert "sweep.finished" in [entry["event"] for entry in logs]


async def report_as_of(url: str, at: datetime) -> tuple[int, str, str]:
    environment = {**os.environ, "DATABASE_URL": url}
    result = await asyncio.to_thread(
        run_cli,
        environment,
        "report",
        "usage",
        "--customer",
        "acme",
        "--as-of",
        at.isoformat(),
        "--format",
        "json",
    )
    return result.returncode, result.stdout, result.stderr


async def test_report_as_of_before_the_kept_history_is_refused_in_one_line(
    services: Services, settings: Settings
) -> None:
    url = settings.database_url.get_secret_value()
    superuser = services.superuser_url(url)
    await add_customer_and_device(superuser)
    await add_history(superuser, "d-old", "allocated", in_month(30))
    await add_history(superuser, "d-gone", "allocated", in_month(30))
    await add_history(superuser, "d-gone", "released", in_month(1))
    await maintain(settings, in_month(10))
    await maintain(settings, NOW)
    reporter = services.reporter_url(url)

    status, out, err = await report_as_of(reporter, in_month(27))
    assert status == 1, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: ")
    assert "is before the kept license history, which begins at" in lines[0]
    assert month_start(25).isoformat() in lines[0]
    assert "LICENSE_HISTORY_RETENTION_MONTHS" in lines[0]

    # Within the kept history: exact, though both allocations' rows were dropped (the
    # baseline keeps them): two licenses before d-gone's release, one after.
    for at, expected in ((month_start(25), 2), (in_month(2), 2), (NOW, 1)):
        status, out, err = await report_as_of(reporter, at)
        assert status == 0, err
        assert json.loads(out)["totals"]["total_licenses"] == expected, (at, out)


async def test_0015_moves_existing_rows_and_keeps_the_workers_grants(services: Services) -> None:
    """An install upgraded with data: every row in its month's partition (older than 36
    months, or in 1970: in the default one), ids continuing, and the worker's privileges
    carried over before `create-roles` runs again."""
    url = await services.create_database("license_migrate")
    try:
        await services.set_up_roles(url)
        owner = await Repository.connect(services.owner_url(url), 1)
        try:
            await owner.apply_migrations([m for m in load_migrations() if m.version <= 14])
            await services.set_up_roles(url)  # the worker's grants on the old tables
            superuser = services.superuser_url(url)
            await add_customer_and_device(superuser)
            for subject, at in (("d1", NOW), ("d2", in_month(5)), ("d3", in_month(40))):
                await add_history(superuser, subject, "allocated", at)
            await fetch(
                superuser,
                "INSERT INTO device_lifecycle_events (customer_id, event_id, device_id, "
                "event_type, occurred_at) VALUES ('acme', 'e1', 'd1', 'install', now()), "
                "('acme', 'e0', 'd1', 'install', '1970-01-02')",
            )
            await fetch(
                superuser,
                "INSERT INTO usage_snapshots VALUES ('acme', $1, gen_random_uuid(), now())",
                in_month(5).date(),
            )
            last_id = await fetchval(superuser, "SELECT max(id) FROM license_history")
            await owner.apply_migrations(load_migrations())
        finally:
            await owner.close()

        history = await fetch(
            superuser,
            "SELECT subject_id, tableoid::regclass::text AS part FROM license_history "
            "ORDER BY subject_id",
        )
        assert [(row["subject_id"], row["part"]) for row in history] == [
            ("d1", partition("license_history", 0)),
            ("d2", partition("license_history", 5)),
            ("d3", "license_history_default"),
        ]
        events = await fetch(
            superuser,
            "SELECT event_id, tableoid::regclass::text AS part FROM device_lifecycle_events "
            "ORDER BY event_id",
        )
        assert [(row["event_id"], row["part"]) for row in events] == [
            ("e0", "device_lifecycle_events_default"),
            ("e1", partition("device_lifecycle_events", 0)),
        ]
        assert await fetchval(
            superuser, "SELECT tableoid::regclass::text FROM usage_snapshots"
        ) == partition("usage_snapshots", 5)

        worker = services.worker_url(url)  # create-roles not run since the migration
        await add_history(worker, "d4", "allocated", NOW)
        assert await fetchval(worker, "SELECT id FROM license_history WHERE subject_id = 'd4'") > (
            last_id
        )
        await fetch(worker, "UPDATE license_history SET subject_id = 'p1' WHERE subject_id = 'd4'")
        for statement in (
            "DELETE FROM license_history",
            "UPDATE license_history SET change = 'released'",
            "DELETE FROM device_lifecycle_events",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await fetch(worker, statement)
    finally:
        await services.drop_database(url)


async def test_reconcile_days_before_the_kept_history_is_refused_in_one_line(
    services: Services, settings: Settings
) -> None:
    """`reconcile --from/--to` compares through the as-of counts: the same refusal."""
    superuser = services.superuser_url(settings.database_url.get_secret_value())
    await add_customer_and_device(superuser)
    await add_history(superuser, "d-old", "allocated", in_month(30))
    await maintain(settings, in_month(10))
    await maintain(settings, NOW)
    old_day = in_month(27).date().isoformat()
    done = await asyncio.to_thread(
        run_cli, settings_environment(settings), "reconcile", "--from", old_day, "--to", old_day
    )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "is before the kept license history, which begins at" in lines[0]


async def test_dropping_a_month_never_waits_for_the_writers_of_devices(
    services: Services, settings: Settings
) -> None:
    """A lifecycle partition has a foreign key to devices: dropped while attached, it takes
    no lock on devices (detached first, its key's drop would lock devices ACCESS EXCLUSIVE:
    the maintenance would wait behind every ingestion batch, and they behind it)."""
    url = settings.database_url.get_secret_value()
    superuser = services.superuser_url(url)
    await add_customer_and_device(superuser)
    assert await add_lifecycle_event(url, "e-old", in_month(14)) == ["e-old"]
    await maintain(settings, in_month(10))  # the month 14 back gets its partition
    assert partition("device_lifecycle_events", 14) in await partitions(
        url, "device_lifecycle_events"
    )
    writer = await asyncpg.connect(superuser)
    transaction = writer.transaction()
    await transaction.start()
    try:
        await writer.execute("UPDATE devices SET os = 'linux'")  # an ingestion batch, open
        changes = await asyncio.wait_for(maintain(settings, NOW), timeout=30)
    finally:
        await transaction.rollback()
        await writer.close()
    assert changes["device_lifecycle_events"][1] == 1
    assert await fetchval(url, "SELECT count(*) FROM device_lifecycle_events") == 0


async def test_creating_a_month_waits_for_a_batch_instead_of_deadlocking_with_it(
    services: Services, settings: Settings
) -> None:
    """Found in the fault run: a lifecycle partition's foreign key makes its creation lock
    devices (SHARE ROW EXCLUSIVE) after the parent table; a batch holds devices and then
    writes a lifecycle event into the parent. The maintenance now takes devices first, so
    it waits for the batch and the batch never waits for it."""
    url = settings.database_url.get_secret_value()
    superuser = services.superuser_url(url)
    await add_customer_and_device(superuser)
    ahead = partition("device_lifecycle_events", -3)
    await fetch(superuser, f"DROP TABLE {ahead}")  # the next pass creates it again
    writer = await asyncpg.connect(superuser)
    try:
        async with writer.transaction():
            await writer.execute("UPDATE devices SET os = 'linux'")  # an ingestion batch
            maintenance = asyncio.create_task(maintain(settings, NOW))
            await asyncio.sleep(1.5)  # the maintenance waits for the batch
            await writer.execute(
                "INSERT INTO device_lifecycle_events (customer_id, event_id, device_id, "
                "event_type, occurred_at) VALUES ('acme', 'e-now', 'd1', 'install', now())"
            )
            await asyncio.sleep(1.5)  # past the deadlock timeout (1 s)
        changes = await asyncio.wait_for(maintenance, timeout=30)
    finally:
        await writer.close()
    assert changes["device_lifecycle_events"][0] == 1
    assert ahead in await partitions(url, "device_lifecycle_events")
    assert await fetchval(url, "SELECT count(*) FROM device_lifecycle_events") == 1

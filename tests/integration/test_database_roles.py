"""The service's database roles (sql/roles/create_roles.sql): the worker role reads and
writes rows and can do nothing else. Every other integration test already runs the worker as
that role."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
from prometheus_client import REGISTRY

from tests.support import (
    OWNER_PASSWORD,
    ROLES,
    Services,
    encode,
    fetch,
    fetchval,
    make_settings,
    migrate_database,
    produce,
    read_all,
    run_cli,
    running_worker,
    settings_environment,
    url_as,
    wait_until,
)
from worker.db.repository import Repository
from worker.db.roles import DatabaseRoles, RoleSetupRefusedError
from worker.db.sql_files import Migration, load_migrations
from worker.sim.fleet import SimulatedDevice, agent_event

pytestmark = pytest.mark.integration

INSUFFICIENT_PRIVILEGE = "42501"


def transient_database_errors() -> float:
    value = REGISTRY.get_sample_value("license_worker_database_errors_total", {"kind": "transient"})
    return value or 0.0


async def refusal(url: str, statement: str) -> asyncpg.PostgresError:
    connection = await asyncpg.connect(url)
    try:
        with pytest.raises(asyncpg.PostgresError) as refused:
            await connection.execute(statement)
    finally:
        await connection.close()
    return refused.value


async def test_the_tests_connect_as_the_worker_role(database_url: str) -> None:
    assert await fetchval(database_url, "SELECT current_user") == ROLES.worker
    role = await fetchval(
        database_url,
        "SELECT row(rolsuper, rolcreaterole, rolcreatedb, rolbypassrls)::text "
        "FROM pg_roles WHERE rolname = current_user",
    )
    assert role == "(f,f,f,f)"


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE TABLE intruder (a int)",
        "DROP TABLE devices",
        "TRUNCATE devices",
        "ALTER TABLE devices ADD COLUMN intruder int",
        "CREATE INDEX intruder ON devices (os)",
        "CREATE TEMPORARY TABLE intruder (a int)",
        "CREATE SCHEMA intruder",
        "CREATE FUNCTION intruder() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE TRIGGER intruder BEFORE INSERT ON devices "
        "FOR EACH ROW EXECUTE FUNCTION suppress_redundant_updates_trigger()",
        "INSERT INTO schema_migrations (version, name, checksum) VALUES (99, 'x', 'x')",
        "DELETE FROM schema_migrations",
        "SELECT * FROM schema_migrations",
    ],
)
async def test_the_worker_role_is_refused_ddl_and_the_migrations_table(
    database_url: str, statement: str
) -> None:
    error = await refusal(database_url, statement)
    assert error.sqlstate == INSUFFICIENT_PRIVILEGE, error


async def test_the_worker_role_cannot_read_another_schema(
    services: Services, database_url: str
) -> None:
    superuser = await asyncpg.connect(services.superuser_url(database_url))
    try:
        await superuser.execute(
            "CREATE SCHEMA other; CREATE TABLE other.secrets (a int); "
            "INSERT INTO other.secrets VALUES (1)"
        )
    finally:
        await superuser.close()
    error = await refusal(database_url, "SELECT * FROM other.secrets")
    assert error.sqlstate == INSUFFICIENT_PRIVILEGE
    assert "permission denied for schema other" in str(error)


# Issue #14 part 6: every statement the worker role may not run, table by table (the grants
# of sql/roles/create_roles.sql are derived from the statements of sql/queries/*.sql).
FORBIDDEN_TO_THE_WORKER = [
    # The history is append-only: the purge may only replace a user's id by its pseudonym.
    "UPDATE license_history SET change = 'released'",
    "UPDATE license_history SET effective_at = now()",
    "UPDATE license_history SET event_id = NULL",
    "UPDATE license_history SET customer_id = 'other'",
    "DELETE FROM license_history",
    "DELETE FROM license_history_default",
    "DROP TABLE license_history_default",
    "ALTER TABLE license_history DETACH PARTITION license_history_default",
    # The baseline of the history (migration 0015): the purge's pseudonym only.
    "UPDATE license_history_baseline SET change = 'released'",
    "INSERT INTO license_history_baseline SELECT * FROM license_history",
    "DELETE FROM license_history_baseline",
    "UPDATE partition_retention SET retained_from = now()",
    "DELETE FROM partition_retention",
    # The device history likewise (migration 0012): the purge replaces the user's id only.
    "UPDATE device_history SET device_kind = 'personal'",
    "UPDATE device_history SET recorded_at = now()",
    "UPDATE device_history SET seen_at = now()",
    "UPDATE device_history SET customer_id = 'other'",
    "DELETE FROM device_history",
    # The outbox: published, and the purge's id and payload rewrite; never its identity.
    "UPDATE license_outbox SET event_id = gen_random_uuid()",
    "UPDATE license_outbox SET customer_id = 'other'",
    "UPDATE license_outbox SET created_at = now()",
    "DELETE FROM license_outbox",
    # Holds: a confirmation cannot be rewritten to another customer or time held.
    "UPDATE sweep_holds SET customer_id = 'other'",
    "UPDATE sweep_holds SET held_at = now()",
    "DELETE FROM sweep_holds",
    # Written once, never changed.
    "UPDATE usage_snapshots SET event_id = gen_random_uuid()",
    "DELETE FROM usage_snapshots",
    "UPDATE device_lifecycle_events SET event_type = 'uninstall'",
    "DELETE FROM device_lifecycle_events",
    # DELETE only where the code deletes (the purge's group memberships).
    "DELETE FROM customers",
    "DELETE FROM users",
    "DELETE FROM devices",
    "DELETE FROM licenses",
    "DELETE FROM subscriptions",
    "DELETE FROM sweep_state",
    "DELETE FROM ingestion_progress",
]


@pytest.mark.parametrize("statement", FORBIDDEN_TO_THE_WORKER)
async def test_the_worker_role_runs_only_the_statements_of_the_code(
    database_url: str, statement: str
) -> None:
    error = await refusal(database_url, statement)
    assert error.sqlstate == INSUFFICIENT_PRIVILEGE, error


async def test_the_pseudonym_key_is_no_longer_in_the_database(database_url: str) -> None:
    assert await fetchval(database_url, "SELECT to_regclass('service_keys') IS NULL")


ALLOWED_TO_THE_WORKER = [
    "UPDATE license_history SET subject_id = subject_id",
    "UPDATE device_history SET user_id = user_id",
    "UPDATE license_outbox SET published_at = now(), subject_id = subject_id, payload = payload",
    "DELETE FROM group_members",
    "UPDATE sweep_holds SET to_boundary = to_boundary",
]


@pytest.mark.parametrize("statement", ALLOWED_TO_THE_WORKER)
async def test_the_worker_role_keeps_what_the_purge_and_relay_need(
    database_url: str, statement: str
) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def test_a_table_a_later_migration_adds_is_not_the_workers_until_granted(
    services: Services, database_url: str
) -> None:
    """No default privileges: a new table gets the worker's grants only when
    sql/roles/create_roles.sql lists them (forgetting shows at once, in every test)."""
    later = Migration(
        len(load_migrations()) + 1,
        "add_later_table",
        "CREATE TABLE later_table (id bigserial PRIMARY KEY, note text NOT NULL);",
    )
    owner = await Repository.connect(services.owner_url(database_url), 1)
    try:
        assert await owner.apply_migrations([*load_migrations(), later]) == [later]
    finally:
        await owner.close()
    await services.set_up_roles(database_url)
    for statement in ("INSERT INTO later_table (note) VALUES ('a')", "SELECT * FROM later_table"):
        assert (await refusal(database_url, statement)).sqlstate == INSUFFICIENT_PRIVILEGE


READ_BY_THE_REPORT = [
    "customers",
    "users",
    "devices",
    "licenses",
    "license_history",
    "device_history",  # as-of detail
    "license_history_baseline",  # as-of, before the kept history (migration 0015)
    "partition_retention",  # where the kept history begins
    "subscriptions",  # seats
    "group_members",  # seats
]
NOT_READ_BY_THE_REPORT = [
    "license_outbox",
    "sweep_holds",
    "legal_holds",
    "erasure_audit",
    "usage_snapshots",
    "ingestion_progress",
    "schema_migrations",
]


async def test_the_reporter_role_reads_what_the_report_reads_and_writes_nothing(
    services: Services, database_url: str
) -> None:
    reporter = services.reporter_url(database_url)
    assert await fetchval(reporter, "SELECT current_user") == ROLES.reporter
    for table in READ_BY_THE_REPORT:
        await fetchval(reporter, f"SELECT count(*) FROM {table}")
        column = "table_name" if table == "partition_retention" else "customer_id"
        for statement in (
            f"INSERT INTO {table} DEFAULT VALUES",
            f"UPDATE {table} SET {column} = {column}",
            f"DELETE FROM {table}",
            f"TRUNCATE {table}",
        ):
            error = await refusal(reporter, statement)
            assert error.sqlstate == INSUFFICIENT_PRIVILEGE, (statement, error)
    for table in NOT_READ_BY_THE_REPORT:
        error = await refusal(reporter, f"SELECT * FROM {table}")
        assert error.sqlstate == INSUFFICIENT_PRIVILEGE, (table, error)


async def test_report_usage_runs_as_the_reporter_role(
    services: Services, database_url: str
) -> None:
    worker = await asyncpg.connect(database_url)
    try:
        await worker.execute("INSERT INTO customers (customer_id, name) VALUES ('acme', 'Acme')")
    finally:
        await worker.close()
    environment = {**os.environ, "DATABASE_URL": services.reporter_url(database_url)}
    result = await asyncio.to_thread(
        run_cli, environment, "report", "usage", "--customer", "acme", "--format", "json"
    )
    assert result.returncode == 0, result.stderr
    assert '"acme"' in result.stdout


async def open_hold(database_url: str) -> None:
    worker = await asyncpg.connect(database_url)
    try:
        await worker.execute("INSERT INTO customers (customer_id) VALUES ('big')")
        await worker.execute(
            "INSERT INTO sweep_holds (customer_id, from_boundary, to_boundary, at_risk, active)"
            " VALUES ('big', now() - interval '1 day', now(), 15, 20)"
        )
    finally:
        await worker.close()


async def test_a_confirmation_records_the_database_login_that_made_it(
    services: Services, database_url: str
) -> None:
    """`confirm-releases` records session_user, not free text: an operator confirming with
    a personal login (a member of the worker role) is named."""
    await open_hold(database_url)
    operator, password = f"ops_{uuid.uuid4().hex[:8]}", "ops-test-password"
    superuser = await asyncpg.connect(services.superuser_url(database_url))
    try:
        await superuser.execute(f"CREATE ROLE {operator} LOGIN PASSWORD '{password}'")
        await superuser.execute(f"GRANT {ROLES.worker} TO {operator}")
        environment = {**os.environ, "DATABASE_URL": url_as(database_url, operator, password)}
        result = await asyncio.to_thread(
            run_cli, environment, "confirm-releases", "big", "--note", "ticket 4711"
        )
        assert result.returncode == 0, result.stderr
        row = (
            await fetch(database_url, "SELECT confirmed_by, confirmation_note FROM sweep_holds")
        )[0]
        assert (row["confirmed_by"], row["confirmation_note"]) == (operator, "ticket 4711")
    finally:
        await superuser.execute(f"REVOKE {ROLES.worker} FROM {operator}")
        await superuser.execute(f"DROP ROLE {operator}")
        await superuser.close()


async def test_a_confirmation_cannot_name_someone_else(database_url: str) -> None:
    await open_hold(database_url)
    worker = await asyncpg.connect(database_url)
    try:
        await worker.execute(
            "UPDATE sweep_holds SET confirmed_at = now(), confirmed_by = 'the-ceo'"
        )
        assert await worker.fetchval("SELECT confirmed_by FROM sweep_holds") == ROLES.worker
        with pytest.raises(asyncpg.PostgresError) as refused:
            await worker.execute("UPDATE sweep_holds SET confirmed_by = 'the-ceo'")
        assert refused.value.sqlstate == INSUFFICIENT_PRIVILEGE
    finally:
        await worker.close()


async def test_migrate_as_the_worker_role_fails_clearly(database_url: str) -> None:
    worker = await Repository.connect(database_url, 1)
    try:
        with pytest.raises(RuntimeError, match=r"role license_worker may not change the schema"):
            await worker.apply_migrations(load_migrations())
    finally:
        await worker.close()


@pytest.fixture
async def empty_database(services: Services) -> AsyncIterator[str]:
    url = await services.create_database("license_roles")
    yield url
    await services.drop_database(url)


async def test_create_roles_again_after_migrations_keeps_least_privilege(
    services: Services, empty_database: str
) -> None:
    """An operator may run `create-roles` again at any time: the worker gets the tables that
    exist, and still not the migrations' bookkeeping."""
    await services.set_up_roles(empty_database)
    await migrate_database(services.owner_url(empty_database))
    superuser = await asyncpg.connect(empty_database)
    try:  # a DBA's hand-made grant, more than the worker should have
        await superuser.execute(f"GRANT TRUNCATE ON devices TO {ROLES.worker}")
    finally:
        await superuser.close()
    await services.set_up_roles(empty_database)

    worker_url = services.worker_url(empty_database)
    assert await fetchval(worker_url, "SELECT count(*) FROM devices") == 0
    for statement in ("TRUNCATE devices", "SELECT * FROM schema_migrations"):
        assert (await refusal(worker_url, statement)).sqlstate == INSUFFICIENT_PRIVILEGE


async def test_create_roles_refuses_a_role_with_powers(
    services: Services, empty_database: str
) -> None:
    """Never strips a superuser (or any role with powers) of them: it refuses instead."""
    superuser_name = await fetchval(empty_database, "SELECT current_user")
    repository = await Repository.connect(empty_database, 1)
    try:
        with pytest.raises(RoleSetupRefusedError, match="powers the service must not have"):
            await repository.set_up_roles(DatabaseRoles(superuser_name, ROLES.worker))
    finally:
        await repository.close()
    assert await fetchval(
        empty_database, "SELECT rolsuper FROM pg_roles WHERE rolname = $1", superuser_name
    )


async def test_create_roles_refuses_a_worker_inside_the_owner_role(
    services: Services, empty_database: str
) -> None:
    superuser = await asyncpg.connect(empty_database)
    try:
        await superuser.execute(
            "DO $$ BEGIN CREATE ROLE license_test_owner NOLOGIN; "
            "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        )
        await superuser.execute(f"GRANT license_test_owner TO {ROLES.worker}")
        repository = await Repository.connect(empty_database, 1)
        try:
            with pytest.raises(RoleSetupRefusedError, match="would have the owner's powers"):
                await repository.set_up_roles(DatabaseRoles("license_test_owner", ROLES.worker))
        finally:
            await repository.close()
    finally:
        await superuser.execute(f"REVOKE license_test_owner FROM {ROLES.worker}")
        await superuser.close()


async def test_a_wrong_password_is_refused(services: Services, database_url: str) -> None:
    """The passwords the tests rely on are really checked (not a trusting server)."""
    wrong = url_as(database_url, ROLES.owner, OWNER_PASSWORD + "-wrong")
    try:
        connection = await asyncpg.connect(wrong)
    except asyncpg.InvalidPasswordError:
        return
    await connection.close()
    pytest.skip("this Postgres trusts connections without checking passwords")


async def test_a_missing_grant_makes_ingestion_wait_and_never_dead_letters(
    services: Services, database_url: str, topics: dict[str, str]
) -> None:
    """A grant the role set-up lost is the operator's to fix: the worker waits (counted as a
    transient database error), stores the batch once the grant is back, and sends nothing
    to the DLQ."""
    owner = await asyncpg.connect(services.owner_url(database_url))
    try:
        await owner.execute(f"REVOKE INSERT ON devices FROM {ROLES.worker}")
        device = SimulatedDevice("c1", "d1", "alice", "business")
        event = agent_event(device, "heartbeat", datetime.now(UTC))
        await produce(
            services.kafka_bootstrap_servers,
            topics["heartbeat_topic"],
            [(device.key, encode(event))],
        )
        refused_before = transient_database_errors()

        async def refused_twice() -> bool:
            return transient_database_errors() >= refused_before + 2

        async with running_worker(make_settings(services, database_url, topics)):
            await wait_until(refused_twice, timeout=30)
            assert await fetchval(database_url, "SELECT count(*) FROM devices") == 0
            await owner.execute(f"GRANT INSERT ON devices TO {ROLES.worker}")

            async def stored() -> bool:
                return await fetchval(database_url, "SELECT count(*) FROM devices") == 1

            await wait_until(stored, timeout=30)
    finally:
        await owner.close()
    assert await read_all(services.kafka_bootstrap_servers, topics["dlq_topic"], 1, 2) == []


async def test_run_stops_at_once_when_postgres_refuses_the_login(
    services: Services, database_url: str, topics: dict[str, str]
) -> None:
    """A wrong password is not an outage: `run` says what to fix and exits 1, without the
    password in its output, instead of waiting forever."""
    wrong_password = "pw-7f3a-not-the-one"
    settings = make_settings(services, url_as(database_url, ROLES.worker, wrong_password), topics)
    started = time.monotonic()
    result = await asyncio.to_thread(run_cli, settings_environment(settings), "run", timeout=60)
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 30
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("Error: Postgres rejected the login (SQLSTATE 28P01)"), last_line
    assert "database.access_refused" in result.stderr
    assert wrong_password not in result.stderr + result.stdout

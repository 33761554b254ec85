"""Citus-ready (issue #15 part 7; docs/scaling.md): on the real migrated schema, every
per-customer table's primary key, foreign keys and unique indexes lead with (or, for unique
indexes, include) `customer_id`; and every statement of sql/queries/*.sql that reads or
writes a per-customer table filters or joins it on `customer_id` (tests/citus_rules.py,
parsed with pglast). The exceptions are listed here, each with its reason; docs/scaling.md
gives the plan and what each costs on Citus. A new table or statement that breaks the rule
fails here until it is fixed or listed."""

from __future__ import annotations

import pytest

from tests.citus_rules import UnkeyedReference, unkeyed_references
from tests.support import fetch
from worker.db.sql_files import parse_named_queries, query_directory

pytestmark = pytest.mark.integration

# Tables without customer_id: Citus reference tables (a copy on every node) or tables of the
# coordinator alone. None is read in a join with a per-customer table.
GLOBAL_TABLES = {
    "schema_migrations": "the migrations' bookkeeping: DDL runs on the coordinator, which "
    "propagates it to the shards; a local table of the coordinator",
    "ingestion_progress": "Kafka offsets per topic partition: a partition carries many "
    "customers, so the row has no customer; a reference table (written once per batch)",
    "sweep_state": "the sweeper's single row (its boundary): global by design, one sweeper "
    "leader for the whole fleet; a reference table",
    "partition_retention": "where the kept rows of each partitioned table begin (migration "
    "0015): three rows at most, read by the report; a reference table",
    "leases": "the sweeper's and the relay's leader leases, one row each: global by design, "
    "one leader of each for the whole fleet; a reference table",
}

# Per-customer tables whose primary key (a bigserial `id`) does not lead with customer_id.
# Citus refuses a primary key or unique index without the distribution column: before
# create_distributed_table each becomes (customer_id, id) (docs/scaling.md, "Keys to change
# first"). license_history's is (customer_id, decided_at, id) since it is partitioned by
# month (migration 0015). Not done here: device_history may be partitioned too, whose key the
# new key must then include; the outbox's id order is what the relay publishes in.
PRIMARY_KEYS_TO_CHANGE = {
    "license_outbox": "id, the relay's publication order; becomes (customer_id, id)",
    "device_history": "id, the order of a device's records; becomes (customer_id, id)",
    "erasure_audit": "id, an audit row's number; becomes (customer_id, id)",
    "sweep_holds": "id, a hold's number in confirm-releases; becomes (customer_id, id)",
}

# Unique indexes of per-customer tables without customer_id, beyond those primary keys.
UNIQUE_INDEXES_TO_CHANGE = {
    "license_outbox_event_id_key": "event_id is unique by construction (keyed hash including "
    "the customer); becomes unique (customer_id, event_id)",
}

# Statements that read a per-customer table without a customer_id condition under AND, or
# with one only under OR (`$1 IS NULL OR customer_id = $1`, every customer when NULL). On
# Citus each is a multi-shard statement: sent to every shard in parallel, one connection per
# shard (or per node with citus.max_adaptive_executor_pool_size), results merged on the
# coordinator. Reason and cost per statement; docs/scaling.md, "Multi-shard statements".
MULTI_SHARD_STATEMENTS = {
    ("ops.sql", "summary"): "`status`: totals over the whole fleet, on demand",
    ("ops.sql", "license_totals"): "metrics: licenses by type and basis over all customers, "
    "once per scrape interval",
    ("ops.sql", "customers_with_licenses"): "metrics: customers holding a license, a count",
    ("relay.sql", "pending_license_events"): "the relay's scan in id order across customers "
    "(one relay): a Citus-ready relay reads per shard (or per customer group) in parallel",
    ("relay.sql", "outbox_backlog"): "the relay's gauges: pending count and oldest age",
    ("relay.sql", "licenses_to_reconcile"): "reconcile: one customer, or all when $1 is NULL",
    ("relay.sql", "subjects_with_pending_events"): "reconcile: one customer, or all",
    ("relay.sql", "unpublished_license_decisions"): "reconcile: one customer, or all; and "
    "max(id) of the whole outbox (a global sequence)",
    ("relay.sql", "license_decisions_written_after"): "reconcile: one customer, or all",
    ("relay.sql", "usage_snapshot_times"): "reconcile --from/--to: one customer, or all",
    ("report.sql", "report_customers"): "report usage: one customer, or all",
    ("report.sql", "report_live_counts"): "report usage: one customer, or all",
    ("report.sql", "report_live_rows"): "report usage: one customer, or all",
    ("report.sql", "report_history_counts"): "report usage --as-of: one customer, or all",
    ("report.sql", "report_history_rows"): "report usage --as-of: one customer, or all",
    ("sweeper.sql", "licenses_at_risk"): "the sweeper: devices silent in a time window, of "
    "every customer (the outage guard counts per customer)",
    ("sweeper.sql", "silent_devices_page"): "the sweeper: keyset pages by (day, customer, "
    "device) across customers",
    ("sweeper.sql", "open_holds"): "the sweeper: every customer's open hold (a few rows)",
    ("sweeper.sql", "extend_unconfirmed_holds"): "the sweeper: every unconfirmed hold",
}


async def per_customer_tables(database_url: str) -> frozenset[str]:
    rows = await fetch(
        database_url,
        "SELECT table_name FROM information_schema.columns "
        "WHERE table_schema = 'public' AND column_name = 'customer_id'",
    )
    return frozenset(row["table_name"] for row in rows)


async def all_tables(database_url: str) -> set[str]:
    """Every table but the partitions of a partitioned one (migration 0015): Citus
    distributes a partitioned table with its partitions, which have its keys."""
    rows = await fetch(
        database_url,
        "SELECT relname FROM pg_class "
        "WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p') "
        "AND NOT relispartition",
    )
    return {row["relname"] for row in rows}


KEYS = """
SELECT c.conrelid::regclass::text AS table_name, c.conname AS name, c.contype::text AS kind,
       (SELECT array_agg(a.attname::text ORDER BY k.position)
        FROM unnest(c.conkey) WITH ORDINALITY AS k (attnum, position)
        JOIN pg_attribute AS a ON a.attrelid = c.conrelid AND a.attnum = k.attnum) AS columns,
       c.confrelid::regclass::text AS referenced_table,
       (SELECT array_agg(a.attname::text ORDER BY k.position)
        FROM unnest(c.confkey) WITH ORDINALITY AS k (attnum, position)
        JOIN pg_attribute AS a ON a.attrelid = c.confrelid AND a.attnum = k.attnum)
           AS referenced_columns
FROM pg_constraint AS c
JOIN pg_class AS t ON t.oid = c.conrelid
WHERE c.connamespace = 'public'::regnamespace AND c.contype IN ('p', 'f')
  AND NOT t.relispartition
ORDER BY 1, 2
"""

UNIQUE_INDEXES = """
SELECT t.relname AS table_name, i.relname AS name,
       (SELECT array_agg(a.attname::text)
        FROM pg_attribute AS a
        WHERE a.attrelid = x.indrelid AND a.attnum = ANY(x.indkey)) AS columns
FROM pg_index AS x
JOIN pg_class AS i ON i.oid = x.indexrelid
JOIN pg_class AS t ON t.oid = x.indrelid
WHERE t.relnamespace = 'public'::regnamespace AND x.indisunique AND NOT t.relispartition
ORDER BY 1, 2
"""


async def test_the_tables_without_customer_id_are_the_global_ones(database_url: str) -> None:
    tables = await all_tables(database_url)
    assert tables - await per_customer_tables(database_url) == set(GLOBAL_TABLES)


async def test_primary_and_foreign_keys_lead_with_customer_id(database_url: str) -> None:
    per_customer = await per_customer_tables(database_url)
    primary_keys_not_leading: dict[str, list[str]] = {}
    foreign_keys_not_leading: list[str] = []
    tables_with_primary_key: set[str] = set()
    for key in await fetch(database_url, KEYS):
        if key["kind"] == "p":
            tables_with_primary_key.add(key["table_name"])
            if key["table_name"] in per_customer and key["columns"][0] != "customer_id":
                primary_keys_not_leading[key["table_name"]] = key["columns"]
        elif key["columns"][0] != "customer_id" or key["referenced_columns"][0] != "customer_id":
            foreign_keys_not_leading.append(key["name"])
    assert tables_with_primary_key == await all_tables(database_url)
    assert foreign_keys_not_leading == []
    assert set(primary_keys_not_leading) == set(PRIMARY_KEYS_TO_CHANGE)
    assert all(columns == ["id"] for columns in primary_keys_not_leading.values())


async def test_unique_indexes_of_per_customer_tables_include_customer_id(
    database_url: str,
) -> None:
    per_customer = await per_customer_tables(database_url)
    without = {
        index["name"]
        for index in await fetch(database_url, UNIQUE_INDEXES)
        if index["table_name"] in per_customer and "customer_id" not in index["columns"]
    }
    expected = {f"{table}_pkey" for table in PRIMARY_KEYS_TO_CHANGE}
    assert without == expected | set(UNIQUE_INDEXES_TO_CHANGE)


def statements() -> dict[tuple[str, str], str]:
    return {
        (path.name, name): text
        for path in sorted(query_directory().glob("*.sql"))
        for name, text in parse_named_queries(path.read_text(encoding="utf-8")).items()
    }


async def test_every_statement_keys_its_per_customer_tables_on_customer_id(
    database_url: str,
) -> None:
    tables = await per_customer_tables(database_url)
    unkeyed: dict[tuple[str, str], list[UnkeyedReference]] = {}
    for statement, text in statements().items():
        if found := unkeyed_references(text, tables):
            unkeyed[statement] = found
    assert set(unkeyed) - set(MULTI_SHARD_STATEMENTS) == set(), "unkeyed and not listed"
    assert set(MULTI_SHARD_STATEMENTS) - set(unkeyed) == set(), "listed but keyed now"


# The checker itself, on statements whose answer is known.
PER_CUSTOMER = frozenset({"devices", "users", "licenses"})


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM devices WHERE customer_id = $1 AND device_id = $2",
        "SELECT * FROM devices AS d WHERE d.customer_id = ANY($1::text[])",
        "SELECT * FROM devices AS d JOIN users AS u "
        "ON u.customer_id = d.customer_id AND u.user_id = d.user_id WHERE d.customer_id = $1",
        "SELECT * FROM devices AS d JOIN unnest($1::text[], $2::text[]) AS b "
        "(customer_id, device_id) USING (customer_id, device_id)",
        "SELECT * FROM users AS u WHERE (u.customer_id, u.user_id) IN (SELECT * FROM x)",
        "UPDATE licenses AS l SET active = false FROM unnest($1::text[]) AS r (customer_id) "
        "WHERE l.customer_id = r.customer_id",
        "DELETE FROM users WHERE customer_id = $1",
        "INSERT INTO devices (customer_id, device_id) VALUES ($1, $2)",
        "SELECT * FROM devices AS d WHERE d.customer_id = $1 AND NOT EXISTS ("
        "SELECT FROM licenses AS l WHERE l.customer_id = d.customer_id)",
    ],
)
def test_the_checker_accepts_keyed_statements(sql: str) -> None:
    assert unkeyed_references(sql, PER_CUSTOMER) == []


@pytest.mark.parametrize(
    ("sql", "unkeyed"),
    [
        ("SELECT * FROM devices WHERE device_id = $1", ["devices"]),
        ("SELECT * FROM devices WHERE $1::text IS NULL OR customer_id = $1", ["devices"]),
        ("SELECT * FROM devices WHERE NOT customer_id = $1", ["devices"]),
        ("SELECT * FROM devices WHERE customer_id <> $1", ["devices"]),
        (
            "SELECT * FROM devices AS d JOIN users AS u ON u.user_id = d.user_id "
            "WHERE d.customer_id = $1",
            ["u"],
        ),
        (
            "SELECT * FROM devices AS d WHERE d.customer_id = $1 AND EXISTS ("
            "SELECT FROM licenses AS l WHERE l.subject_id = d.device_id)",
            ["l"],
        ),
        ("UPDATE licenses SET active = false WHERE subject_id = $1", ["licenses"]),
        ("DELETE FROM users", ["users"]),
        ("INSERT INTO users (user_id) VALUES ($1)", ["users"]),
        ("SELECT * FROM devices WHERE (last_seen_day, customer_id) > ($1, $2)", ["devices"]),
    ],
)
def test_the_checker_finds_unkeyed_references(sql: str, unkeyed: list[str]) -> None:
    assert [found.alias for found in unkeyed_references(sql, PER_CUSTOMER)] == unkeyed

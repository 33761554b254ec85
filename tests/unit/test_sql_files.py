"""`worker.db.sql_files`: named queries from `sql/queries/*.sql` and the ordered migrations."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from worker.db import sql_files
from worker.db.sql_files import (
    Migration,
    load_migrations,
    parse_named_queries,
    queries,
    query,
    split_statements,
)

REPOSITORY = Path(__file__).parents[2]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("-- name: one\nSELECT 1;\n", {"one": "SELECT 1;"}, id="one"),
        pytest.param(
            "-- name: one\nSELECT 1;\n\n-- name: two\nSELECT 2;\n",
            {"one": "SELECT 1;", "two": "SELECT 2;"},
            id="two",
        ),
        pytest.param(
            "-- Header comment.\nSELECT 0;\n-- name: one\nSELECT 1;",
            {"one": "SELECT 1;"},
            id="text-before-first-name-ignored",
        ),
        pytest.param(
            "-- name: one\n-- $1: ids\nSELECT *\nFROM t\nWHERE id = $1;",
            {"one": "-- $1: ids\nSELECT *\nFROM t\nWHERE id = $1;"},
            id="comments-and-lines-kept",
        ),
        pytest.param(
            "-- name: one   \n\n  SELECT 1;  \n\n\n",
            {"one": "SELECT 1;"},
            id="surrounding-white-space-stripped",
        ),
        pytest.param(
            "-- name: get_2_things\nSELECT 2;", {"get_2_things": "SELECT 2;"}, id="digits"
        ),
        pytest.param(
            "-- name: empty\n-- name: full\nSELECT 1;",
            {"empty": "", "full": "SELECT 1;"},
            id="empty-block",
        ),
        pytest.param(
            "-- name: one\nSELECT '-- name: two';",
            {"one": "SELECT '-- name: two';"},
            id="name-not-at-line-start",
        ),
        pytest.param(
            "-- name: one\r\nSELECT 1;\r\n-- name: two\r\nSELECT 2;\r\n",
            {"one": "SELECT 1;", "two": "SELECT 2;"},
            id="crlf",
        ),
    ],
)
def test_parse_named_queries(text: str, expected: dict[str, str]) -> None:
    assert parse_named_queries(text) == expected


@pytest.mark.parametrize(
    "text", ["", "SELECT 1;\n", "-- name: Bad\nSELECT 1;"], ids=["empty", "sql-only", "bad-name"]
)
def test_text_without_names_has_no_queries(text: str) -> None:
    try:
        result: dict[str, str] | str = parse_named_queries(text)
    except ValueError as error:  # a clear message would be as good as an empty result
        result = str(error)
    assert result == {} or "zip()" not in str(result)


def test_parse_named_queries_keeps_file_order() -> None:
    text = "-- name: zeta\nSELECT 1;\n-- name: alpha\nSELECT 2;\n"
    assert list(parse_named_queries(text)) == ["zeta", "alpha"]


@pytest.mark.parametrize(
    "text",
    [
        "-- name: one\nSELECT 1;\n-- name: one\nSELECT 2;\n",
        "-- name: one\n-- name: two\nSELECT 2;\n-- name: one\n",
    ],
    ids=["adjacent", "apart"],
)
def test_duplicate_query_name_is_an_error(text: str) -> None:
    with pytest.raises(ValueError, match="'one' is defined twice"):
        parse_named_queries(text)


# --- the real query files ------------------------------------------------------------------


def test_real_queries_load_and_none_is_empty() -> None:
    loaded = queries()
    assert loaded
    for name, sql in loaded.items():
        statement = "\n".join(
            line for line in sql.splitlines() if not line.lstrip().startswith("--")
        ).strip()
        assert statement, f"query {name!r} has no SQL"


def test_real_query_files_are_what_is_loaded() -> None:
    assert sql_files.sql_directory() == REPOSITORY / "sql"
    expected: dict[str, str] = {}
    paths = sorted((REPOSITORY / "sql" / "queries").glob("*.sql"))
    assert len(paths) > 1, "expected one query file per area"
    for path in paths:
        expected |= parse_named_queries(path.read_text(encoding="utf-8"))
    assert queries() == expected


def test_no_query_file_is_left_outside_sql_queries() -> None:
    assert list((REPOSITORY / "sql").glob("*.sql")) == []


def test_a_name_defined_in_two_files_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "queries", {"a.sql": "-- name: one\nSELECT 1;\n", "b.sql": "-- name: one\n"})
    monkeypatch.setattr(sql_files, "sql_directory", lambda: tmp_path)
    sql_files.queries.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"'one' is defined twice \(b\.sql\)"):
            queries()
    finally:
        sql_files.queries.cache_clear()


def test_every_query_the_worker_names_exists() -> None:
    called = set()
    for path in (REPOSITORY / "worker").rglob("*.py"):
        called |= set(
            re.findall(
                r"""\b(?:query|fetch|execute|stream)\(\s*["']([a-z0-9_]+)["']""",
                path.read_text("utf-8"),
            )
        )
    assert called, "expected the worker to call query(...)"
    assert called <= set(queries())


def test_query_by_name() -> None:
    name = next(iter(queries()))
    assert query(name) == queries()[name]
    with pytest.raises(KeyError):
        query("no_such_query")


# --- migrations -----------------------------------------------------------------------------


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, sql in files.items():
        (directory / name).write_text(sql, encoding="utf-8")
    return directory


def test_migrations_load_in_version_order(tmp_path: Path) -> None:
    directory = write(
        tmp_path / "migrations",
        {
            "0003_add_index.sql": "CREATE INDEX i ON t (b);",
            "0001_create_table.sql": "CREATE TABLE t (a int);",
            "0002_add_column.sql": "ALTER TABLE t ADD b int;",
        },
    )
    assert load_migrations(directory) == [
        Migration(1, "create_table", "CREATE TABLE t (a int);"),
        Migration(2, "add_column", "ALTER TABLE t ADD b int;"),
        Migration(3, "add_index", "CREATE INDEX i ON t (b);"),
    ]


def test_versions_past_9_sort_numerically(tmp_path: Path) -> None:
    files = {f"{version:04d}_step_{version}.sql": f"-- {version}" for version in range(1, 13)}
    migrations = load_migrations(write(tmp_path / "m", files))
    assert [migration.version for migration in migrations] == list(range(1, 13))


def test_empty_migration_directory(tmp_path: Path) -> None:
    assert load_migrations(write(tmp_path / "m", {})) == []


def test_checksum_is_the_sha256_of_the_sql() -> None:
    migration = Migration(1, "x", "CREATE TABLE é (a int);")
    expected = hashlib.sha256("CREATE TABLE é (a int);".encode()).hexdigest()
    assert migration.checksum == expected
    assert Migration(1, "x", "CREATE TABLE e (a int);").checksum != expected
    assert Migration(2, "y", migration.sql).checksum == expected


@pytest.mark.parametrize(
    "bad_name",
    [
        "1_create.sql",
        "00001_create.sql",
        "0002-create.sql",
        "0002_Create.sql",
        "0002_create.SQL",
        "0002_create.sql.bak",
        "0002_create.sql~",
        "0002_.sql",
        "0002_create table.sql",
        "0002_create-table.sql",
        "create.sql",
        "README.md",
        ".DS_Store",
    ],
)
def test_badly_named_file_is_an_error(tmp_path: Path, bad_name: str) -> None:
    directory = write(tmp_path / "m", {"0001_create.sql": "SELECT 1;", bad_name: "SELECT 2;"})
    with pytest.raises(ValueError, match=re.escape(repr(bad_name))):
        load_migrations(directory)


@pytest.mark.parametrize(
    "names",
    [
        ["0002_second.sql"],
        ["0001_first.sql", "0003_third.sql"],
        ["0000_zero.sql", "0001_first.sql"],
        ["0001_first.sql", "0001_again.sql"],
        ["0001_first.sql", "0002_second.sql", "0004_fourth.sql"],
    ],
    ids=["starts-at-2", "gap", "version-0", "duplicate-version", "gap-at-end"],
)
def test_versions_must_be_1_to_n_without_gaps(tmp_path: Path, names: list[str]) -> None:
    directory = write(tmp_path / "m", dict.fromkeys(names, "SELECT 1;"))
    with pytest.raises(ValueError, match="without gaps"):
        load_migrations(directory)


def test_real_migrations_load_in_order() -> None:
    directory = REPOSITORY / "sql" / "migrations"
    migrations = load_migrations()
    assert migrations == load_migrations(directory)
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    file_names = sorted(path.name for path in directory.iterdir())
    assert [f"{m.version:04d}_{m.name}.sql" for m in migrations] == file_names
    for migration in migrations:
        assert migration.sql.strip(), f"migration {migration.name} is empty"
        assert len(migration.checksum) == 64


def test_a_migration_is_transactional_unless_its_first_line_says_otherwise() -> None:
    marked = Migration(
        13, "index", "-- migrate: no-transaction\nCREATE INDEX CONCURRENTLY i ON t (a);"
    )
    mentioned_later = Migration(13, "x", "CREATE TABLE t (a int);\n-- migrate: no-transaction\n")
    assert not marked.transactional
    assert mentioned_later.transactional
    assert all(migration.transactional for migration in load_migrations())


def test_a_no_transaction_migration_splits_at_semicolons_ending_a_line() -> None:
    sql = (
        "-- migrate: no-transaction\n"
        "-- why; it says\n"
        "DROP INDEX CONCURRENTLY IF EXISTS i;\n"
        "CREATE INDEX CONCURRENTLY i\n    ON t (a) WHERE b <> ';';  \n"
    )
    assert split_statements(sql) == [
        "DROP INDEX CONCURRENTLY IF EXISTS i",
        "CREATE INDEX CONCURRENTLY i\n    ON t (a) WHERE b <> ';'",
    ]


def test_a_no_transaction_migration_may_not_hold_a_function_body() -> None:
    with pytest.raises(ValueError, match="dollar-quoted"):
        split_statements("CREATE FUNCTION f() RETURNS int AS $$ SELECT 1; $$ LANGUAGE sql;")

"""Finds the SQL files: named queries from `sql/queries/*.sql` (one file per area:
`ingest.sql`, `licensing.sql`, `report.sql`, ...), the ordered migrations in
`sql/migrations/` and the role setup in `sql/roles/`.

In a query file, a block starts with a line `-- name: <name>` and runs to the next one; text
before the first name (the file's header) belongs to no query."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

_NAME_LINE = re.compile(r"^-- name: (?P<name>[a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
_MIGRATION_FILE = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")
NO_TRANSACTION_MARKER = "-- migrate: no-transaction"
# A statement of a no-transaction migration ends with `;` at the end of a line.
_STATEMENT_END = re.compile(r";[ \t]*(?:\n|$)")
_DOLLAR_QUOTE = re.compile(r"\$[A-Za-z_]*\$")


def sql_directory() -> Path:
    """`worker/sql` in an installed wheel, the repository's `sql/` in a checkout."""
    package = Path(__file__).parents[1]  # worker/
    packaged = package / "sql"
    return packaged if packaged.is_dir() else package.parent / "sql"


def query_directory() -> Path:
    return sql_directory() / "queries"


def parse_named_queries(text: str) -> dict[str, str]:
    names = list(_NAME_LINE.finditer(text))
    queries: dict[str, str] = {}
    for index, match in enumerate(names):
        following = names[index + 1] if index + 1 < len(names) else None
        end = following.start() if following else len(text)
        name = match.group("name")
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        queries[name] = text[match.end() : end].strip()
    return queries


@cache
def queries() -> dict[str, str]:
    """Every named query of every query file; a name defined twice is an error."""
    merged: dict[str, str] = {}
    for path in sorted(query_directory().glob("*.sql")):
        for name, text in parse_named_queries(path.read_text(encoding="utf-8")).items():
            if name in merged:
                raise ValueError(f"query {name!r} is defined twice ({path.name})")
            merged[name] = text
    return merged


def query(name: str) -> str:
    return queries()[name]


def role_setup_queries() -> dict[str, str]:
    """The blocks that create the service's roles, in the order they run. Kept apart from
    `queries()`: a superuser runs them, never the worker."""
    path = sql_directory() / "roles" / "create_roles.sql"
    return parse_named_queries(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()

    @property
    def transactional(self) -> bool:
        """False for a migration whose first line is `-- migrate: no-transaction`: it runs
        statement by statement outside a transaction (`CREATE INDEX CONCURRENTLY`)."""
        first_line = self.sql.split("\n", 1)[0].strip()
        return first_line != NO_TRANSACTION_MARKER


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """Every migration file in version order; a badly named file is an error, not skipped."""
    directory = directory or sql_directory() / "migrations"
    migrations = []
    for path in sorted(directory.iterdir()):
        match = _MIGRATION_FILE.match(path.name)
        if match is None:
            raise ValueError(f"migration file name {path.name!r} is not NNNN_snake_case.sql")
        migrations.append(
            Migration(int(match.group("version")), match.group("name"), path.read_text("utf-8"))
        )
    versions = [migration.version for migration in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migration versions must be 1..n without gaps, found {versions}")
    return migrations


def split_statements(sql: str) -> list[str]:
    """The statements of a no-transaction migration, each run on its own (several
    statements sent at once would run in one implicit transaction, which `CREATE INDEX
    CONCURRENTLY` refuses). A statement ends with `;` at the end of a line; comment lines
    are dropped. No dollar-quoted bodies: put functions in a transactional migration."""
    if _DOLLAR_QUOTE.search(sql):
        raise ValueError("a no-transaction migration cannot hold dollar-quoted bodies")
    kept = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [statement.strip() for statement in _STATEMENT_END.split(kept) if statement.strip()]

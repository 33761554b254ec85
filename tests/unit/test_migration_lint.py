"""squawk, the migration linter of `make lint`, with the repository's .squawk.toml: the
migrations pass, a new migration is linted in full, and only migrations applied before
squawk ran are excluded (their text is checksummed, docs/migrations.md)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from worker.db.sql_files import NO_TRANSACTION_MARKER, load_migrations

ROOT = Path(__file__).resolve().parents[2]
SQUAWK = Path(sys.executable).parent / "squawk"
CONFIG = ROOT / ".squawk.toml"
LAST_MIGRATION_BEFORE_SQUAWK = 12
SQUAWK_NO_TRANSACTION = "-- squawk-disable-assume-in-transaction"


def squawk(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SQUAWK), "--config", str(CONFIG), "--reporter", "gcc", *map(str, paths)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_migrations_pass_the_linter() -> None:
    # Relative paths, as `make lint` passes them: excluded_paths match them so.
    linted = squawk(*sorted(p.relative_to(ROOT) for p in (ROOT / "sql/migrations").glob("*.sql")))
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_a_new_migration_that_blocks_writes_is_flagged(tmp_path: Path) -> None:
    migration = tmp_path / "0013_index_devices.sql"
    migration.write_text("CREATE INDEX devices_by_os ON devices (customer_id, os);\n")
    linted = squawk(migration)
    assert linted.returncode != 0
    assert "require-concurrent-index-creation" in linted.stdout


def test_a_no_transaction_migration_as_documented_passes(tmp_path: Path) -> None:
    migration = tmp_path / "0013_index_devices.sql"
    migration.write_text(
        f"{NO_TRANSACTION_MARKER}\n{SQUAWK_NO_TRANSACTION}\n"
        "DROP INDEX CONCURRENTLY IF EXISTS devices_by_os;\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS devices_by_os ON devices (customer_id, os);\n"
    )
    linted = squawk(migration)
    assert linted.returncode == 0, linted.stdout


def test_only_migrations_applied_before_squawk_are_excluded() -> None:
    excluded = tomllib.loads(CONFIG.read_text())["excluded_paths"]
    names = {f"sql/migrations/{m.version:04d}_{m.name}.sql": m.version for m in load_migrations()}
    for path in excluded:
        assert path in names, f"{path} is no migration"
        assert names[path] <= LAST_MIGRATION_BEFORE_SQUAWK, f"{path}: lint it, or justify inline"


def test_a_no_transaction_migration_tells_squawk() -> None:
    for migration in load_migrations():
        if not migration.transactional:
            assert SQUAWK_NO_TRANSACTION in migration.sql.splitlines()[:3], migration.name

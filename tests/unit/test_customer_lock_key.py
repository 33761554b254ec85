"""The customer's advisory lock (docs/licensing.md, "Customer locks: no hot rows"): both
statements that take it use the same key, in the two-int form with a class of its own, so
the shared and the exclusive side meet, and the one-bigint locks (relay, sweeper,
migrations) never do."""

from __future__ import annotations

from worker.db.sql_files import queries, query

CLASS_ID = "773629486"  # hashtext('license-telemetry:customer')


def flat(text: str) -> str:
    """The statement without its comments, on one line with single spaces."""
    return " ".join(" ".join(line.split("--")[0] for line in text.splitlines()).split())


def test_the_shared_and_the_exclusive_side_use_one_key() -> None:
    shared = flat(query("share_customers"))
    exclusive = flat(query("lock_customer_key"))
    assert f"pg_advisory_xact_lock_shared({CLASS_ID}, k)" in shared
    assert "SELECT DISTINCT hashtext(customer_id) AS k" in shared
    assert "ORDER BY k" in shared
    assert f"pg_advisory_xact_lock({CLASS_ID}, hashtext($1::text))" in exclusive


def test_only_the_customer_lock_uses_its_class() -> None:
    users = {name for name, text in queries().items() if CLASS_ID in flat(text)}
    assert users == {"share_customers", "lock_customer_key"}

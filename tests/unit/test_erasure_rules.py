"""The pure parts of erasure: the keyed hash, the check of the operator's note, receipts."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest

from worker.licensing.erasure_rules import (
    MAX_NOTE_LENGTH,
    ErasureTarget,
    Receipt,
    Scope,
    note_problem,
    removed_counts,
    subject_hash,
)

ALICE = ErasureTarget(Scope.USER, "acme", "alice@acme.example")


def test_the_subject_hash_is_keyed_and_not_a_plain_hash() -> None:
    first = subject_hash(b"k" * 32, ALICE)
    assert first == subject_hash(b"k" * 32, ALICE), "deterministic: checkable with the key"
    assert first != subject_hash(b"x" * 32, ALICE), "another key, another hash"
    assert (
        first.removeprefix("hmac-sha256:") != hashlib.sha256(ALICE.subject_id.encode()).hexdigest()
    )
    assert "alice" not in first


def test_the_subject_hash_tells_scopes_and_customers_apart() -> None:
    key = b"k" * 32
    hashes = {
        subject_hash(key, ALICE),
        subject_hash(key, ErasureTarget(Scope.USER, "globex", ALICE.subject_id)),
        subject_hash(key, ErasureTarget(Scope.DEVICE, "acme", ALICE.subject_id)),
    }
    assert len(hashes) == 3


@pytest.mark.parametrize(
    ("note", "refused"),
    [
        ("ticket GDPR-42", None),
        ("", "empty"),
        ("   ", "empty"),
        ("x" * (MAX_NOTE_LENGTH + 1), "longer"),
        ("ticket\x1b[31m", "control"),
        ("request of ALICE@acme.example", "identifier"),
        ("asked by User Alice", "identifier"),
        ("laptop host-alice-laptop", "identifier"),
    ],
)
def test_a_note_may_not_name_the_person(note: str, refused: str | None) -> None:
    identifiers = [ALICE.subject_id, "User Alice", "host-alice-laptop", None, ""]
    problem = note_problem(note, identifiers)
    if refused is None:
        assert problem is None
    else:
        assert problem is not None
        assert refused in problem


def test_targets_need_their_customer_except_a_customer() -> None:
    assert ErasureTarget.of(Scope.CUSTOMER, "acme", None) == ErasureTarget(
        Scope.CUSTOMER, "acme", "acme"
    )
    assert ErasureTarget.of(Scope.DEVICE, "d1", "acme").customer_id == "acme"
    with pytest.raises(ValueError, match="--customer"):
        ErasureTarget.of(Scope.USER, "alice", None)
    with pytest.raises(ValueError, match="drop --customer"):
        ErasureTarget.of(Scope.CUSTOMER, "acme", "globex")


def test_the_receipt_counts_rows_by_table() -> None:
    removed = removed_counts(
        {"users": 1, "devices": 2, "licenses": 1, "history": 3, "memberships": 0, "outbox": 2},
        devices=1,
        customers=1,
    )
    assert removed == {
        "users": 1,
        "devices": 3,
        "licenses": 1,
        "license_history": 3,
        "license_outbox": 2,
        "customers": 1,
    }
    at = datetime(2027, 1, 1, tzinfo=UTC)
    receipt = Receipt(7, "erased", Scope.USER, "acme", "hmac-sha256:ab", removed, at, "w", "t-1")
    as_json = receipt.as_json()
    assert as_json["rows_removed"] == 11
    assert as_json["recorded_at"] == "2027-01-01T00:00:00+00:00"
    assert as_json["scope"] == "user"

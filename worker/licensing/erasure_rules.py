"""Pure parts of erasure on request and legal holds: what an erasure is about, the keyed hash
that stands for the erased identifier in the audit, the check of the operator's note, and
the deletion receipt."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

MAX_NOTE_LENGTH = 500


class Scope(StrEnum):
    USER = "user"
    DEVICE = "device"
    CUSTOMER = "customer"


@dataclass(frozen=True, slots=True)
class ErasureTarget:
    """What a request names: a user or a device of a customer, or the whole customer."""

    scope: Scope
    customer_id: str
    subject_id: str

    @classmethod
    def of(cls, scope: Scope, subject_id: str, customer_id: str | None) -> ErasureTarget:
        if scope is Scope.CUSTOMER:
            if customer_id not in (None, subject_id):
                raise ValueError("a customer is named by its id alone: drop --customer")
            return cls(scope, subject_id, subject_id)
        if not customer_id:
            raise ValueError(f"a {scope.value} is named within its customer: give --customer")
        return cls(scope, customer_id, subject_id)


def subject_hash(key: bytes, target: ErasureTarget) -> str:
    """Stands for the erased identifier in the audit: HMAC-SHA256 with the pseudonym key, so
    whoever holds the key can check that a given person's data was erased, and nobody
    without it can test a guessed e-mail against the audit (a plain SHA-256 of an e-mail is
    found by hashing candidates)."""
    message = "\x00".join(("erasure", target.scope.value, target.customer_id, target.subject_id))
    return "hmac-sha256:" + hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def note_problem(note: str, identifiers: Iterable[str | None]) -> str | None:
    """Why the operator's note (`--reason`) cannot be kept, or None. The note is stored in
    the audit, which must hold no personal data: it may not contain the erased identifiers
    (user id, e-mail, display name, host names), compared without case."""
    stripped = note.strip()
    if not stripped:
        return "the reason is empty: say why (a ticket number, not a name)"
    if len(stripped) > MAX_NOTE_LENGTH:
        return f"the reason is longer than {MAX_NOTE_LENGTH} characters"
    if any(not character.isprintable() for character in stripped):
        return "the reason contains control characters"
    lowered = stripped.casefold()
    for identifier in identifiers:
        if identifier and identifier.strip() and identifier.strip().casefold() in lowered:
            return (
                "the reason contains the identifier being erased (or the person's e-mail, "
                "name or host name); the audit must not keep it: give a ticket number instead"
            )
    return None


@dataclass(frozen=True, slots=True)
class Receipt:
    """What an erasure (or a hold change) did, as stored in `erasure_audit` and printed."""

    receipt_id: int
    action: str
    scope: Scope
    customer_id: str
    subject_hash: str
    removed: Mapping[str, int]
    recorded_at: datetime
    requested_by: str
    reason: str
    events: list[str] = field(default_factory=list)

    @property
    def rows_removed(self) -> int:
        return sum(self.removed.values())

    def as_json(self) -> dict[str, object]:
        return {
            "receipt_id": self.receipt_id,
            "action": self.action,
            "scope": self.scope.value,
            "customer_id": self.customer_id,
            "subject_hash": self.subject_hash,
            "removed": dict(self.removed),
            "rows_removed": self.rows_removed,
            "recorded_at": self.recorded_at.isoformat(),
            "requested_by": self.requested_by,
            "reason": self.reason,
            "events": list(self.events),
        }


def removed_counts(purge_result: Mapping[str, int], **more: int) -> dict[str, int]:
    """`purge_users`' counts (and any others) by table name, without the zeros."""
    names = {
        "users": "users",
        "devices": "devices",
        "device_history": "device_history",
        "licenses": "licenses",
        "history": "license_history",
        "memberships": "group_members",
        "outbox": "license_outbox",
    }
    counts: dict[str, int] = {}
    for column, table in names.items():
        counts[table] = counts.get(table, 0) + int(purge_result.get(column, 0))
    for table, count in more.items():
        counts[table] = counts.get(table, 0) + count
    return {table: count for table, count in counts.items() if count}

"""The invariants, each a function from what was expected and what was observed to the
violations found, with the first few concrete examples so that a failure can be diagnosed."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import orjson

from tests.faults.model import ExpectedDevice, Model, TimeRange
from tests.faults.observe import Stored, TopicRecord
from tests.faults.rules import DeviceState, LicenseKey, expected_licenses
from tests.faults.stream import Message, Poison

EXAMPLES = 5
DEVICE_FIELDS = ("user_id", "device_kind", "hostname", "os", "agent_version", "protected")


@dataclass(slots=True)
class Violation:
    invariant: str
    examples: list[str] = field(default_factory=list)
    count: int = 0

    def add(self, example: str) -> None:
        self.count += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(example)

    def __str__(self) -> str:
        lines = [f"{self.invariant}: {self.count} violation(s); first {len(self.examples)}:"]
        return "\n".join([*lines, *(f"    - {example}" for example in self.examples)])


@dataclass(slots=True)
class Findings:
    """Violations by invariant, and the tallies the figures table reports."""

    violations: dict[str, Violation] = field(default_factory=dict)
    lost: int = 0
    doubled: int = 0
    mismatches: int = 0

    def report(self, invariant: str, example: str, *, tally: str | None = "mismatches") -> None:
        """`tally`: the figure this violation adds to (None: an operational one, such as a
        deadlock, that is none of lost, doubled or mismatched data)."""
        self.violations.setdefault(invariant, Violation(invariant)).add(example)
        if tally is not None:
            setattr(self, tally, getattr(self, tally) + 1)

    @property
    def failed(self) -> list[Violation]:
        return [v for v in self.violations.values() if v.count]


@dataclass(frozen=True, slots=True)
class DeadLetterExpectation:
    """A poison message as produced: where it landed and what it was."""

    topic: str
    partition: int
    offset: int
    message: Message


def check_devices(model: Model, stored: Stored, findings: Findings) -> None:
    rows = {(r["customer_id"], r["device_id"]): r for r in stored.devices}
    for key, expected in sorted(model.devices.items()):
        row = rows.get(key)
        if row is None:
            findings.report("devices: every device stored", f"{key} missing", tally="lost")
            continue
        for problem in _device_differences(expected, row):
            findings.report("devices: fields equal the newest signal", f"{key}: {problem}")
    for key in sorted(set(rows) - set(model.devices)):
        findings.report("devices: every device stored", f"{key} stored but never sent")


def _device_differences(expected: ExpectedDevice, row: asyncpg.Record) -> Iterable[str]:
    wanted = {
        "user_id": expected.user_id,
        "device_kind": expected.kind,
        "hostname": expected.hostname,
        "os": expected.os,
        "agent_version": expected.agent_version,
        "protected": expected.protected,
    }
    for name in DEVICE_FIELDS:
        if row[name] != wanted[name]:
            yield f"{name} stored {row[name]!r}, newest signal says {wanted[name]!r}"
    for name in ("first_seen_at", "last_seen_at"):
        expected_time: TimeRange = getattr(expected, name)
        if not expected_time.contains(row[name]):
            yield f"{name} stored {_iso(row[name])}, signals say {expected_time}"


def check_lifecycle(model: Model, stored: Stored, findings: Findings) -> None:
    rows: dict[tuple[str, str], list[asyncpg.Record]] = defaultdict(list)
    for row in stored.lifecycle:
        rows[(row["customer_id"], row["event_id"])].append(row)
    invariant = "lifecycle: each install/uninstall stored once"
    for key, expected in sorted(model.lifecycle.items()):
        found = rows.get(key, [])
        if not found:
            findings.report(invariant, f"{key} ({expected.event_type}) missing", tally="lost")
        elif len(found) > 1:
            findings.report(invariant, f"{key} stored {len(found)} times", tally="doubled")
        elif (found[0]["device_id"], found[0]["event_type"], found[0]["occurred_at"]) != (
            expected.device_id,
            expected.event_type,
            expected.occurred_at,
        ):
            findings.report(invariant, f"{key}: stored {dict(found[0])}, sent {expected}")
    for key in sorted(set(rows) - set(model.lifecycle)):
        findings.report(invariant, f"{key} stored but never sent")


def check_users(model: Model, stored: Stored, findings: Findings) -> None:
    rows = {(r["customer_id"], r["user_id"]): r for r in stored.users}
    for key, expected in sorted(model.users.items()):
        row = rows.get(key)
        if row is None:
            findings.report("users: every user stored", f"{key} missing", tally="lost")
            continue
        if not expected.last_seen_at.contains(row["last_seen_at"]):
            findings.report(
                "users: last seen is the newest signal of their devices",
                f"{key}: last_seen_at stored {_iso(row['last_seen_at'])}, "
                f"signals say {expected.last_seen_at}",
            )
        if not expected.first_seen_at.contains(row["first_seen_at"]) or row["email"] != (
            expected.email
        ):
            findings.report(
                "users: first seen and profile",
                f"{key}: stored ({_iso(row['first_seen_at'])}, {row['email']!r}), "
                f"signals say ({expected.first_seen_at}, {expected.email!r})",
            )
    for key in sorted(set(rows) - set(model.users)):
        findings.report("users: every user stored", f"{key} stored but never named")


def check_licenses(
    model: Model,
    stored: Stored,
    license_models: Mapping[str, str],
    now: datetime,
    window: timedelta,
    findings: Findings,
) -> None:
    """Active licenses equal the rules applied to the stored devices, and to the model."""
    active = {
        (r["customer_id"], r["subject_type"], r["subject_id"]): r["basis"]
        for r in stored.licenses
        if r["active"]
    }
    stored_devices = [_stored_state(row) for row in stored.devices]
    from_store = expected_licenses(stored_devices, license_models, now, window)
    modelled = [_model_state(device) for device in model.devices.values()]
    from_model = expected_licenses(modelled, license_models, now, window)
    for name, expected, devices in (
        ("licenses: the rules applied to the stored devices", from_store, stored_devices),
        ("licenses: the rules applied to the model of the stream", from_model, modelled),
    ):
        context = _DeviceContext(devices)
        for key in sorted(set(active) | set(expected)):
            if active.get(key) != expected.get(key):
                findings.report(
                    name,
                    f"{key}: stored {active.get(key) or 'no license'}, rules say "
                    f"{expected.get(key) or 'no license'}{context.describe(key)}",
                )


def _stored_state(row: asyncpg.Record) -> DeviceState:
    return DeviceState(
        customer_id=row["customer_id"],
        device_id=row["device_id"],
        user_id=row["user_id"],
        kind=row["device_kind"],
        protected=row["protected"],
        first_seen_at=row["first_seen_at"],
        last_seen_at=row["last_seen_at"],
    )


def _model_state(device: ExpectedDevice) -> DeviceState:
    return DeviceState(
        customer_id=device.customer_id,
        device_id=device.device_id,
        user_id=device.user_id,
        kind=device.kind,
        protected=device.protected,
        first_seen_at=device.first_seen_at.low,
        last_seen_at=device.last_seen_at.low,
    )


class _DeviceContext:
    """The user's devices beside a license mismatch: kind, first seen, protected."""

    def __init__(self, devices: Sequence[DeviceState]) -> None:
        self._by_user: dict[tuple[str, str], list[DeviceState]] = defaultdict(list)
        self._by_id = {(d.customer_id, d.device_id): d for d in devices}
        for device in devices:
            if device.user_id is not None:
                self._by_user[(device.customer_id, device.user_id)].append(device)

    def describe(self, key: LicenseKey) -> str:
        customer_id, subject_type, subject_id = key
        if subject_type == "device":
            device = self._by_id.get((customer_id, subject_id))
            if device is None or device.user_id is None:
                return ""
            user = (customer_id, device.user_id)
        else:
            user = (customer_id, subject_id)
        devices = sorted(self._by_user.get(user, []), key=lambda d: (d.first_seen_at, d.device_id))
        shown = ", ".join(
            f"{d.device_id} {d.kind or 'business?'} first {_iso(d.first_seen_at)}"
            f"{'' if d.protected else ' uninstalled'}"
            for d in devices
        )
        return f" (user {user[1]}: {shown})"


def check_license_events(
    stored: Stored, events: Sequence[TopicRecord], findings: Findings
) -> dict[str, int]:
    """Billing's view: the topic de-duplicated by event_id; each subject's last license
    event must say what its stored license says. Returns counts for the figures."""
    seen: set[str] = set()
    history: dict[LicenseKey, list[dict[str, Any]]] = defaultdict(list)
    for record in sorted(events, key=lambda r: (r.partition, r.offset)):
        event = orjson.loads(record.value or b"{}")
        if event.get("event_id") in seen:
            continue
        seen.add(event["event_id"])
        if event.get("type") in ("license.allocated", "license.released"):
            key = (event["customer_id"], event["subject_type"], event["subject_id"])
            history[key].append(event)
    rows = {(r["customer_id"], r["subject_type"], r["subject_id"]): r for r in stored.licenses}
    invariant = "billing: each subject's last license event matches its stored license"
    for key in sorted(set(rows) | set(history)):
        row, subject_events = rows.get(key), history.get(key, [])
        wanted = (
            None if row is None else "license.allocated" if row["active"] else "license.released"
        )
        last = subject_events[-1]["type"] if subject_events else None
        if last != wanted:
            state = "no license row" if row is None else ("active" if row["active"] else "released")
            findings.report(
                invariant,
                f"{key}: stored {state}, billing saw {_event_trail(subject_events)}",
                tally="lost",
            )
        _check_alternation(key, subject_events, findings)
        _check_intervals(key, subject_events, findings)
    return {"distinct": len(seen), "records": len(events)}


def _check_alternation(
    key: LicenseKey, events: Sequence[dict[str, Any]], findings: Findings
) -> None:
    for before, after in itertools.pairwise(events):
        if before["type"] == after["type"]:
            findings.report(
                "billing: allocations and releases alternate (never charged twice)",
                f"{key}: {_event_trail(events)}",
                tally="doubled",
            )
            return


def _check_intervals(key: LicenseKey, events: Sequence[dict[str, Any]], findings: Findings) -> None:
    """docs/licensing.md, "The one rule for effective times": by `sequence`, a subject's
    events take effect in order, so no interval opens before the previous one closed."""
    numbered = [e for e in events if isinstance(e.get("sequence"), int)]
    try:
        times = [
            datetime.fromisoformat(e["effective_at"])
            for e in sorted(numbered, key=lambda e: e["sequence"])
        ]
    except (KeyError, TypeError, ValueError):
        return  # no effective time to compare (the harness's own model tests)
    if any(later < earlier for earlier, later in itertools.pairwise(times)):
        findings.report(
            "billing: a subject's intervals are ordered and never overlap",
            f"{key}: {_event_trail(events)}",
            tally="doubled",
        )


def _event_trail(events: Sequence[dict[str, Any]]) -> str:
    if not events:
        return "no event"
    return " -> ".join(
        f"{e['type'].removeprefix('license.')}({e.get('reason')} @ {e.get('effective_at')})"
        for e in events[-4:]
    )


def check_dead_letters(
    expected: Sequence[DeadLetterExpectation],
    letters: Sequence[TopicRecord],
    findings: Findings,
) -> dict[str, int]:
    """Every poison message is dead-lettered (once, after de-duplication by source), with its
    bytes unchanged (the oversized one may be truncated); nothing else is."""
    by_source: dict[tuple[str, int, int], list[TopicRecord]] = defaultdict(list)
    for letter in letters:
        by_source[_source(letter)].append(letter)
    invariant = "dead letters: every bad message exactly once, nothing else"
    wanted = {(e.topic, e.partition, e.offset): e for e in expected}
    for source, expectation in sorted(wanted.items()):
        copies = by_source.get(source, [])
        poison = expectation.message.poison
        assert poison is not None
        if not copies:
            findings.report(invariant, f"{poison.value} at {source}: no dead letter", tally="lost")
            continue
        problem = _letter_problem(copies[0], expectation.message)
        if problem:
            findings.report(invariant, f"{poison.value} at {source}: {problem}")
    for source in sorted(set(by_source) - set(wanted)):
        reason = by_source[source][0].headers.get("dlq.error.class", b"?").decode()
        findings.report(invariant, f"{source}: dead-lettered ({reason}) but valid", tally="lost")
    return {"records": len(letters), "sources": len(by_source)}


def _source(letter: TopicRecord) -> tuple[str, int, int]:
    headers = letter.headers
    return (
        headers.get("dlq.source.topic", b"").decode(),
        int(headers.get("dlq.source.partition", b"-1")),
        int(headers.get("dlq.source.offset", b"-1")),
    )


def _letter_problem(letter: TopicRecord, message: Message) -> str | None:
    reason = letter.headers.get("dlq.error.class", b"").decode()
    if reason != (message.poison.value if message.poison else None):
        return f"reason {reason!r}"
    if letter.key != message.key:
        return "key changed"
    if message.poison is Poison.OVERSIZED:
        value = letter.value or b""
        return None if message.value.startswith(value) else "value changed (not a truncation)"
    return None if letter.value == message.value else "value changed"


def _iso(value: datetime | None) -> str:
    return "NULL" if value is None else value.isoformat()

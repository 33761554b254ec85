"""Does billing's view agree with the stored licenses? For every subject (a user or a
device), the license events on the topic, de-duplicated by `event_id` as billing does, must
end where the database stands: an active license's last event is `license.allocated` (or
`license.package_changed`), a
released one's `license.released`, with the same event number (`sequence`), and no number
missing in between. A lost re-allocation, or any event that never reached the topic, shows
up here.

The database is read first, on one snapshot, and the topic after it, up to its end at that
time: every event of a decision the snapshot holds is then either on the topic or still in
the outbox (such subjects are counted as pending, not compared). Events of decisions newer
than the snapshot have higher numbers and are ignored.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import orjson

from worker.db.repository import Repository
from worker.kafka.clients import read_until_end
from worker.settings import Settings

# A package change takes the subject's next number too (issue #18, part 2); the license is
# still held after it.
LICENSE_EVENT_TYPES = ("license.allocated", "license.released", "license.package_changed")
RELEASED = "license.released"
SubjectKey = tuple[str, str, str]  # customer_id, subject_type, subject_id


@dataclass(frozen=True, slots=True)
class TopicEvent:
    """A license event as read from the topic, at its position there."""

    customer_id: str
    subject_type: str
    subject_id: str
    event_type: str
    event_id: str
    sequence: int | None
    position: tuple[int, int]  # partition, offset

    @property
    def subject(self) -> SubjectKey:
        return (self.customer_id, self.subject_type, self.subject_id)


@dataclass(frozen=True, slots=True)
class StoredLicense:
    customer_id: str
    subject_type: str
    subject_id: str
    active: bool
    event_sequence: int

    @property
    def subject(self) -> SubjectKey:
        return (self.customer_id, self.subject_type, self.subject_id)


@dataclass(frozen=True, slots=True)
class SubjectMismatch:
    customer_id: str
    subject_type: str
    subject_id: str
    problem: str
    stored_active: bool | None
    stored_sequence: int | None
    last_event_type: str | None
    last_sequence: int | None

    def describe(self) -> str:
        stored = (
            "not stored"
            if self.stored_active is None
            else f"stored {'active' if self.stored_active else 'released'} #{self.stored_sequence}"
        )
        topic = (
            "no event on the topic"
            if self.last_event_type is None
            else f"topic's last {self.last_event_type} #{self.last_sequence}"
        )
        return (
            f"{self.customer_id} {self.subject_type} {self.subject_id}: {self.problem} "
            f"({stored}, {topic})"
        )


@dataclass(slots=True)
class SubjectEvents:
    """One subject's events on the topic, each event id once."""

    by_sequence: dict[int, TopicEvent] = field(default_factory=dict)
    # Events without a number (written before numbers existed), in topic order.
    unnumbered: list[TopicEvent] = field(default_factory=list)

    def add(self, event: TopicEvent) -> None:
        if event.sequence is None:
            self.unnumbered.append(event)
        else:
            self.by_sequence.setdefault(event.sequence, event)

    def last(self, up_to: int | None = None) -> TopicEvent | None:
        """The newest event, ignoring numbers above `up_to` (decisions newer than the
        database snapshot)."""
        numbers = [n for n in self.by_sequence if up_to is None or n <= up_to]
        if numbers:
            return self.by_sequence[max(numbers)]
        return max(self.unnumbered, key=lambda e: e.position, default=None)

    def missing_numbers(self, up_to: int) -> list[int]:
        """Numbers absent between the oldest one on the topic and `up_to`: an older event may
        have left the topic with its retention, a newer one never arrived."""
        present = [n for n in self.by_sequence if n <= up_to]
        if not present:
            return []
        return [n for n in range(min(present), up_to + 1) if n not in self.by_sequence]


@dataclass(frozen=True, slots=True)
class Reconciliation:
    mismatches: list[SubjectMismatch]
    compared: int
    pending: int
    unreadable_events: int


def events_by_subject(events: Iterable[TopicEvent]) -> dict[SubjectKey, SubjectEvents]:
    """Each subject's events, de-duplicated by event id as billing does."""
    seen: set[str] = set()
    subjects: dict[SubjectKey, SubjectEvents] = defaultdict(SubjectEvents)
    for event in events:
        if event.event_id in seen:
            continue
        seen.add(event.event_id)
        subjects[event.subject].add(event)
    return dict(subjects)


def compare(
    stored: Iterable[StoredLicense],
    on_topic: Mapping[SubjectKey, SubjectEvents],
    pending: set[SubjectKey],
) -> tuple[list[SubjectMismatch], int]:
    """The subjects whose events disagree with their stored license, and how many subjects
    were compared. Pure: the caller reads both sides."""
    mismatches: list[SubjectMismatch] = []
    compared = 0
    stored_subjects = set()
    for license_row in stored:
        stored_subjects.add(license_row.subject)
        if license_row.subject in pending:
            continue
        compared += 1
        problem = _stored_problem(license_row, on_topic.get(license_row.subject))
        if problem is not None:
            mismatches.append(problem)
    for subject, events in on_topic.items():
        if subject in stored_subjects or subject in pending:
            continue
        compared += 1
        last = events.last()
        # A purged user's license row carries a pseudonym now; its last event was a release.
        if last is not None and last.event_type != RELEASED:
            mismatches.append(_mismatch(subject, "billed but not stored", None, last))
    mismatches.sort(key=lambda m: (m.customer_id, m.subject_type, m.subject_id))
    return mismatches, compared


def _stored_problem(row: StoredLicense, events: SubjectEvents | None) -> SubjectMismatch | None:
    expected = "license.allocated" if row.active else RELEASED
    last = events.last(up_to=row.event_sequence) if events else None
    if last is None:
        return _mismatch(row.subject, "no event on the topic", row, None)
    if (last.event_type != RELEASED) != row.active:
        return _mismatch(row.subject, f"last event is not {expected}", row, last)
    if last.sequence is not None and last.sequence != row.event_sequence:
        return _mismatch(row.subject, f"event #{row.event_sequence} is missing", row, last)
    missing = events.missing_numbers(row.event_sequence) if events else []
    if missing:
        numbers = ", ".join(f"#{n}" for n in missing)
        return _mismatch(row.subject, f"events {numbers} are missing", row, last)
    return None


def _mismatch(
    subject: SubjectKey,
    problem: str,
    row: StoredLicense | None,
    last: TopicEvent | None,
) -> SubjectMismatch:
    return SubjectMismatch(
        *subject,
        problem=problem,
        stored_active=row.active if row else None,
        stored_sequence=row.event_sequence if row else None,
        last_event_type=last.event_type if last else None,
        last_sequence=last.sequence if last else None,
    )


def topic_event(value: bytes | None, position: tuple[int, int]) -> TopicEvent | None:
    """The license event in a record's value; None for other event types. Raises ValueError
    for a value that is not a license event at all."""
    if value is None:
        raise ValueError("empty record")
    event = orjson.loads(value)
    if not isinstance(event, dict):
        raise ValueError("not a JSON object")
    if event.get("type") not in LICENSE_EVENT_TYPES:
        return None
    sequence = event.get("sequence")
    return TopicEvent(
        customer_id=str(event["customer_id"]),
        subject_type=str(event["subject_type"]),
        subject_id=str(event["subject_id"]),
        event_type=str(event["type"]),
        event_id=str(event["event_id"]),
        sequence=sequence if isinstance(sequence, int) else None,
        position=position,
    )


async def reconcile_subjects(
    settings: Settings, repository: Repository, customer_id: str | None = None
) -> Reconciliation:
    """Compares every stored license (of `customer_id`, or all) with the topic."""
    async with repository.snapshot() as session:
        stored = [
            StoredLicense(
                row["customer_id"],
                row["subject_type"],
                row["subject_id"],
                row["active"],
                row["event_sequence"],
            )
            for row in await session.fetch("licenses_to_reconcile", customer_id)
        ]
        pending = {
            (row["customer_id"], row["subject_type"], row["subject_id"])
            for row in await session.fetch("subjects_with_pending_events", customer_id)
        }
    events: list[TopicEvent] = []
    unreadable = 0
    async for record in read_until_end(settings, settings.license_events_topic):
        try:
            event = topic_event(record.value, (record.partition, record.offset))
        except (ValueError, KeyError):
            unreadable += 1
            continue
        if event is not None and customer_id in (None, event.customer_id):
            events.append(event)
    mismatches, compared = compare(stored, events_by_subject(events), pending)
    return Reconciliation(mismatches, compared, len(pending), unreadable)

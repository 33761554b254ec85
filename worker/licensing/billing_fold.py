"""The reference billing consumer: folds `license.events.v1` into license intervals per
subject and counts them per customer and package at any instant. Pure: the caller reads the
topic and hands each decoded event to `BillingFold.add`, in topic order.

What it relies on (docs/licensing.md, "For billing"):
- A subject is (`customer_id`, `subject_type`, `subject_id`). Its `license.allocated`,
  `license.released` and `license.package_changed` events are numbered by `sequence` (1, 2,
  ...) and folded in that order, whatever order they arrive in: allocated opens an interval
  at `effective_at`, released closes it, package_changed closes the held package's interval
  and opens the new package's at `effective_at` (the license itself goes on).
- An event id seen before is a redelivery and changes nothing. Duplicates are recognised
  within their subject, so memory holds the subjects' events, not a set of every id.
- A purged or erased user (`user.purged`, `user.erased`) is renamed to a pseudonym in the
  service, never on the topic: the user's events keep the id billing knows, and every one of
  its intervals was closed by a release before the rename. The rename changes no count, so
  the fold ignores those events. A purged user who signals again starts a new life under
  the same id, numbered from 1 again: an allocation #1 after a release begins one.
- Two times per event: `effective_at` (event time: what is billed) and `emitted_at` (the
  service's decision time: what the service knew then, as the as-of report and the daily
  snapshot count it). `held_at` counts on the first, `known_at` on the second.

Counts at an instant T take every change at or before T: an interval [start, end) holds at T
when start <= T < end, as `report usage --as-of T` takes every decision made at or before T.
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from worker.licensing.usage import NO_PACKAGE

ALLOCATED, RELEASED, PACKAGE_CHANGED = "allocated", "released", "package_changed"
LICENSE_EVENT_KINDS = {
    "license.allocated": ALLOCATED,
    "license.released": RELEASED,
    "license.package_changed": PACKAGE_CHANGED,
}
PACKAGES = ("core", "core_plus")
SUBJECT_TYPES = ("user", "device")

SubjectKey = tuple[str, str, str]  # customer_id, subject_type, subject_id
CustomerPackage = tuple[str, str]  # customer_id, package ("none": no package)


@dataclass(frozen=True, slots=True)
class BilledEvent:
    """One license event of a subject, as billing keeps it."""

    event_id: str
    kind: str  # allocated, released, package_changed
    sequence: int | None  # None: published before events were numbered
    package: str  # NO_PACKAGE when the license is attributed to none
    effective_at: datetime
    decided_at: datetime  # the event's `emitted_at`


@dataclass(frozen=True, slots=True)
class UsageSnapshot:
    """A `usage.snapshot` event: a customer's licenses per package at `taken_at`."""

    event_id: str
    customer_id: str
    day: date
    taken_at: datetime
    by_package: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class Interval:
    """A license held from `start` up to `end` (None: still held), under one package."""

    start: datetime
    end: datetime | None
    package: str


@dataclass(frozen=True, slots=True)
class SubjectAnomaly:
    """A subject whose events billing cannot fold without guessing."""

    customer_id: str
    subject_type: str
    subject_id: str
    problem: str

    def describe(self) -> str:
        return f"{self.customer_id} {self.subject_type} {self.subject_id}: {self.problem}"


def license_event(event: Mapping[str, Any]) -> tuple[SubjectKey, BilledEvent] | None:
    """The subject and license event of a decoded topic record; None for any other type.
    Raises ValueError for a license event billing cannot trust (a field missing or of the
    wrong kind)."""
    kind = LICENSE_EVENT_KINDS.get(_text(event, "type"))
    if kind is None:
        return None
    subject_type = _text(event, "subject_type")
    if subject_type not in SUBJECT_TYPES:
        raise ValueError(f"subject_type {subject_type!r} of a license event")
    package = event.get("package")
    if package is not None and package not in PACKAGES:
        raise ValueError(f"unknown package {package!r}")
    sequence = event.get("sequence")
    if sequence is not None and (type(sequence) is not int or sequence < 1):
        raise ValueError(f"sequence {sequence!r} is not a positive integer")
    subject = (_text(event, "customer_id"), subject_type, _text(event, "subject_id"))
    return subject, BilledEvent(
        event_id=_text(event, "event_id"),
        kind=kind,
        sequence=sequence,
        package=package or NO_PACKAGE,
        effective_at=_time(event, "effective_at"),
        decided_at=_time(event, "emitted_at"),
    )


def usage_snapshot(event: Mapping[str, Any]) -> UsageSnapshot | None:
    """The snapshot in a decoded `usage.snapshot` record; None for any other type. Raises
    ValueError for a malformed one."""
    if event.get("type") != "usage.snapshot":
        return None
    by_package = event.get("by_package")
    if not isinstance(by_package, dict):
        raise ValueError("usage.snapshot without by_package")
    totals = {}
    for name, counts in by_package.items():
        total = counts.get("total_licenses") if isinstance(counts, dict) else None
        if type(total) is not int or total < 0:
            raise ValueError(f"usage.snapshot package {name!r} without a total")
        totals[str(name)] = total
    try:
        day = date.fromisoformat(_text(event, "day"))
    except ValueError:
        raise ValueError("usage.snapshot with a malformed day") from None
    return UsageSnapshot(
        event_id=_text(event, "event_id"),
        customer_id=_text(event, "customer_id"),
        day=day,
        taken_at=_time(event, "taken_at"),
        by_package=totals,
    )


def _text(event: Mapping[str, Any], name: str) -> str:
    value = event.get(name)
    if not isinstance(value, str):
        raise ValueError(f"{name} is not a string")
    return value


def _time(event: Mapping[str, Any], name: str) -> datetime:
    try:
        value = datetime.fromisoformat(_text(event, name))
    except ValueError:
        raise ValueError(f"{name} is not an ISO 8601 time") from None
    if value.tzinfo is None:
        raise ValueError(f"{name} has no time zone")
    return value.astimezone(UTC)


def end_of_day(day: date) -> datetime:
    """The instant a UTC day ends: the next day's midnight (a change at it is applied)."""
    return datetime.combine(day + timedelta(days=1), time.min, UTC)


@dataclass(slots=True)
class _Life:
    """A subject's events from its first allocation on; a purged user who returns starts a
    new one."""

    numbered: dict[int, BilledEvent] = field(default_factory=dict)
    unnumbered: list[BilledEvent] = field(default_factory=list)

    def ordered(self) -> list[BilledEvent]:
        return self.unnumbered + [self.numbered[n] for n in sorted(self.numbered)]

    def ids(self) -> Iterator[str]:
        yield from (e.event_id for e in self.unnumbered)
        yield from (e.event_id for e in self.numbered.values())

    def ends_released(self) -> bool:
        events = self.ordered()
        return bool(events) and events[-1].kind == RELEASED


@dataclass(slots=True)
class _Subject:
    lives: list[_Life] = field(default_factory=lambda: [_Life()])
    conflicts: list[str] = field(default_factory=list)


class BillingFold:
    """Every subject's license events, each event id once; the intervals and counts they
    make."""

    def __init__(self) -> None:
        self._subjects: dict[SubjectKey, _Subject] = defaultdict(_Subject)
        self.events = 0
        self.duplicates = 0

    def add(self, subject: SubjectKey, event: BilledEvent) -> None:
        state = self._subjects[subject]
        if any(event.event_id in life.ids() for life in state.lives):
            self.duplicates += 1
            return
        self.events += 1
        life = state.lives[-1]
        if event.sequence is None:
            life.unnumbered.append(event)
            return
        if event.sequence not in life.numbered:
            life.numbered[event.sequence] = event
        elif event.sequence == 1 and event.kind == ALLOCATED and life.ends_released():
            state.lives.append(_Life(numbered={1: event}))  # returned after a purge
        else:
            state.conflicts.append(
                f"two events numbered #{event.sequence} "
                f"({life.numbered[event.sequence].kind}, {event.kind})"
            )

    @property
    def subjects(self) -> int:
        return len(self._subjects)

    def customers(self) -> set[str]:
        return {customer_id for customer_id, _, _ in self._subjects}

    def intervals(self) -> dict[SubjectKey, list[Interval]]:
        """Each subject's billed intervals by `effective_at`, in order."""
        return {
            subject: [i for life in state.lives for i in _life_intervals(life.ordered())[0]]
            for subject, state in self._subjects.items()
        }

    def anomalies(self) -> list[SubjectAnomaly]:
        """Gaps in a subject's numbers, two events with one number, and events that do not
        follow (a release of nothing, an allocation of a license already held)."""
        found = []
        for subject, state in sorted(self._subjects.items()):
            problems = list(state.conflicts)
            for life in state.lives:
                problems += _gaps(sorted(life.numbered))
                problems += _life_intervals(life.ordered())[1]
            found += [SubjectAnomaly(*subject, problem) for problem in problems]
        return found

    def held_at(self, instants: Iterable[datetime]) -> dict[datetime, Counter[CustomerPackage]]:
        """Licenses held at each instant by `effective_at`: what billing charges."""
        changes: list[tuple[datetime, CustomerPackage, int]] = []
        for (customer_id, _, _), intervals in self.intervals().items():
            for interval in intervals:
                key = (customer_id, interval.package)
                changes.append((interval.start, key, 1))
                if interval.end is not None:
                    changes.append((interval.end, key, -1))
        return _counts_at(changes, instants)

    def known_at(self, instants: Iterable[datetime]) -> dict[datetime, Counter[CustomerPackage]]:
        """Licenses held at each instant as the service had decided them by then (each
        subject's latest event by `emitted_at`): what the as-of report and the daily
        snapshot count."""
        changes: list[tuple[datetime, CustomerPackage, int]] = []
        for (customer_id, _, _), state in self._subjects.items():
            decided = [e for life in state.lives for e in life.ordered()]
            decided.sort(key=lambda e: e.decided_at)  # stable: number order among equal times
            held: str | None = None
            for event in decided:
                now_held = None if event.kind == RELEASED else event.package
                if now_held == held:
                    continue
                if held is not None:
                    changes.append((event.decided_at, (customer_id, held), -1))
                if now_held is not None:
                    changes.append((event.decided_at, (customer_id, now_held), 1))
                held = now_held
        return _counts_at(changes, instants)

    def daily_bill(self, days: Iterable[date]) -> dict[date, Counter[CustomerPackage]]:
        """Licenses held at the end of each UTC day, per customer and package."""
        days = list(days)
        held = self.held_at(end_of_day(d) for d in days)
        return {d: held[end_of_day(d)] for d in days}


def _life_intervals(events: list[BilledEvent]) -> tuple[list[Interval], list[str]]:
    """A life's intervals, folded in number order, and what did not follow."""
    intervals: list[Interval] = []
    problems: list[str] = []
    open_since: datetime | None = None
    last_end: datetime | None = None
    package = NO_PACKAGE
    for event in events:
        label = f"#{event.sequence}" if event.sequence is not None else "an unnumbered event"
        at = event.effective_at
        if open_since is not None and at < open_since:
            problems.append(f"{label} {event.kind} takes effect before the interval it changes")
            at = open_since
        if (
            event.kind == ALLOCATED
            and last_end is not None
            and open_since is None
            and at < last_end
        ):
            problems.append(f"{label} {event.kind} takes effect before the previous interval ended")
            at = last_end
        if event.kind == ALLOCATED:
            if open_since is not None:
                problems.append(f"{label} allocates a license already held")
                intervals.append(Interval(open_since, at, package))
            open_since, package = at, event.package
        elif open_since is None:
            problems.append(f"{label} {event.kind} of a license not held")
        elif event.kind == PACKAGE_CHANGED:
            intervals.append(Interval(open_since, at, package))
            open_since, package = at, event.package
        else:
            intervals.append(Interval(open_since, at, package))
            open_since, last_end = None, at
    if open_since is not None:
        intervals.append(Interval(open_since, None, package))
    return intervals, problems


def _gaps(numbers: list[int]) -> list[str]:
    """Numbers missing between the lowest present and the highest: the lowest may be above
    1 when older events left the topic with its retention."""
    if not numbers:
        return []
    present = set(numbers)
    missing = [n for n in range(numbers[0], numbers[-1] + 1) if n not in present]
    return [f"event #{n} is missing" for n in missing]


def _counts_at(
    changes: list[tuple[datetime, CustomerPackage, int]], instants: Iterable[datetime]
) -> dict[datetime, Counter[CustomerPackage]]:
    """The sum of the changes at or before each instant, per key (a sweep over both in time
    order)."""
    changes.sort(key=lambda change: change[0])
    times = [change[0] for change in changes]
    result: dict[datetime, Counter[CustomerPackage]] = {}
    running: Counter[CustomerPackage] = Counter()
    applied = 0
    for instant in sorted(set(instants)):
        upto = bisect.bisect_right(times, instant)
        for _, key, delta in changes[applied:upto]:
            running[key] += delta
        applied = upto
        result[instant] = Counter({key: n for key, n in running.items() if n})
    return result

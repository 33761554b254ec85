"""`worker.licensing.reconcile`: the stored licenses against the license events on the topic."""

from __future__ import annotations

import itertools

import orjson
import pytest

from worker.licensing.reconcile import (
    StoredLicense,
    TopicEvent,
    compare,
    events_by_subject,
    topic_event,
)

ALLOCATED, RELEASED = "license.allocated", "license.released"
_offsets = itertools.count()


def event(
    event_type: str,
    sequence: int | None,
    subject_id: str = "dev-1",
    event_id: str | None = None,
    subject_type: str = "device",
) -> TopicEvent:
    offset = next(_offsets)
    return TopicEvent(
        "acme",
        subject_type,
        subject_id,
        event_type,
        event_id or f"{subject_id}-{event_type}-{sequence}-{offset}",
        sequence,
        (0, offset),
    )


def stored(active: bool, sequence: int, subject_id: str = "dev-1") -> StoredLicense:
    return StoredLicense("acme", "device", subject_id, active, sequence)


def problems(rows: list[StoredLicense], events: list[TopicEvent]) -> list[str]:
    mismatches, _ = compare(rows, events_by_subject(events), set())
    return [m.problem for m in mismatches]


def test_a_subject_whose_events_end_where_the_database_stands_agrees() -> None:
    events = [event(ALLOCATED, 1), event(RELEASED, 2), event(ALLOCATED, 3)]
    assert problems([stored(True, 3)], events) == []
    mismatches, compared = compare([stored(True, 3)], events_by_subject(events), set())
    assert (mismatches, compared) == ([], 1)


def test_the_lost_reallocation_is_found() -> None:
    """The fault run's defect: the database holds the license, billing's last word on it
    was a release."""
    events = [event(ALLOCATED, 1), event(RELEASED, 2)]
    assert problems([stored(True, 3)], events) == ["last event is not license.allocated"]


def test_a_missing_pair_in_between_is_a_gap_even_when_the_last_type_agrees() -> None:
    events = [event(ALLOCATED, 1), event(RELEASED, 2)]
    assert problems([stored(False, 4)], events) == ["event #4 is missing"]
    events = [event(ALLOCATED, 1), event(ALLOCATED, 3), event(RELEASED, 4)]
    assert problems([stored(False, 4)], events) == ["events #2 are missing"]


def test_events_older_than_the_topic_retention_are_not_a_gap() -> None:
    assert problems([stored(True, 7)], [event(RELEASED, 6), event(ALLOCATED, 7)]) == []


def test_an_active_license_billing_never_heard_of() -> None:
    assert problems([stored(True, 1)], []) == ["no event on the topic"]


def test_an_allocation_on_the_topic_for_a_subject_not_stored() -> None:
    assert problems([], [event(ALLOCATED, 1)]) == ["billed but not stored"]
    # A purged user's row carries its pseudonym now; the topic ended with the release.
    purged = events_by_subject([event(ALLOCATED, 1), event(RELEASED, 2)])
    assert compare([], purged, set()) == ([], 1)


def test_redelivered_events_count_once_and_newer_decisions_are_ignored() -> None:
    first = event(ALLOCATED, 1, event_id="e1")
    events = [first, event(RELEASED, 2, event_id="e2"), first, event(ALLOCATED, 3)]
    # The database was read before decision #3 was made and published.
    assert problems([stored(False, 2)], events) == []


def test_subjects_with_unpublished_events_are_not_compared() -> None:
    rows = [stored(True, 2)]
    mismatches, compared = compare(
        rows, events_by_subject([event(ALLOCATED, 1)]), {("acme", "device", "dev-1")}
    )
    assert (mismatches, compared) == ([], 0)


def test_events_from_before_event_numbers_are_ordered_by_their_place_on_the_topic() -> None:
    legacy = [event(ALLOCATED, None), event(RELEASED, None)]
    assert problems([stored(False, 2)], legacy) == []
    assert problems([stored(True, 2)], legacy) == ["last event is not license.allocated"]
    # Numbered events follow the legacy ones after the upgrade.
    assert problems([stored(True, 3)], [*legacy, event(ALLOCATED, 3)]) == []


def test_a_user_and_a_device_with_one_id_are_two_subjects() -> None:
    rows = [stored(True, 1, "alice"), StoredLicense("acme", "user", "alice", False, 2)]
    events = [
        event(ALLOCATED, 1, "alice"),
        event(ALLOCATED, 1, "alice", subject_type="user"),
        event(RELEASED, 2, "alice", subject_type="user"),
    ]
    assert problems(rows, events) == []


def test_mismatches_describe_both_sides() -> None:
    mismatches, _ = compare([stored(True, 3)], events_by_subject([event(RELEASED, 2)]), set())
    assert mismatches[0].describe() == (
        "acme device dev-1: last event is not license.allocated "
        "(stored active #3, topic's last license.released #2)"
    )


def test_topic_records_are_read_as_license_events_or_skipped() -> None:
    payload = {
        "event_id": "e1",
        "type": ALLOCATED,
        "customer_id": "acme",
        "subject_type": "user",
        "subject_id": "alice",
        "sequence": 4,
    }
    parsed = topic_event(orjson.dumps(payload), (2, 17))
    assert parsed == TopicEvent("acme", "user", "alice", ALLOCATED, "e1", 4, (2, 17))
    assert topic_event(orjson.dumps({**payload, "type": "usage.snapshot"}), (0, 0)) is None
    for bad, why in ((b"not json", "invalid literal"), (b"[1]", "not a JSON object")):
        with pytest.raises(ValueError, match=why):
            topic_event(bad, (0, 0))
    with pytest.raises(ValueError, match="empty record"):
        topic_event(None, (0, 0))


PACKAGE_CHANGED = "license.package_changed"


def test_a_package_change_is_a_numbered_event_of_a_held_license() -> None:
    """`license.package_changed` takes the subject's next number (issue #18, part 2): it is
    neither a gap nor a release, and a license whose last event is one is held."""
    events = [event(ALLOCATED, 1), event(PACKAGE_CHANGED, 2)]
    assert problems([stored(True, 2)], events) == []
    assert problems([stored(False, 2)], events) == ["last event is not license.released"]
    assert problems([stored(False, 3)], [*events, event(RELEASED, 3)]) == []
    assert problems([], events) == ["billed but not stored"]
    change = {
        "event_id": "e2",
        "type": PACKAGE_CHANGED,
        "customer_id": "acme",
        "subject_type": "user",
        "subject_id": "alice",
        "sequence": 2,
    }
    parsed = topic_event(orjson.dumps(change), (0, 3))
    assert parsed == TopicEvent("acme", "user", "alice", PACKAGE_CHANGED, "e2", 2, (0, 3))

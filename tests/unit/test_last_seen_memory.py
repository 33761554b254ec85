"""`worker.ingest.last_seen_memory`: which heartbeats are not written, and the bounded memory
of what each replica wrote."""

from __future__ import annotations

import gc
import random
import tracemalloc
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas import AGENT_EVENT_ADAPTER
from worker.ingest.coalesce import BatchChanges, DeviceChange, coalesce
from worker.ingest.last_seen_memory import (
    REFRESH,
    SKIPPABLE,
    WRITE,
    LastSeenMemory,
    Remembered,
    co_partitioning_problem,
    is_refresh,
    is_skippable,
    keep_back_unchanged,
    merge_earlier,
)

S = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
PRECISION = timedelta(minutes=15)
KEY = ("cust-1", "dev-1")
TOPICS = ("agent.heartbeat.v1", "agent.lifecycle.v1")
# What a device's latest write left, with 22-character device ids and 30-character user ids
# (52 bytes of the ~100 measured): the figure is in docs/ingestion.md.
MAX_BYTES_PER_DEVICE = 115


def at(minutes: float) -> datetime:
    return S + timedelta(minutes=minutes)


def fold(*events: dict[str, Any]) -> BatchChanges:
    documents = [
        AGENT_EVENT_ADAPTER.validate_python(
            {
                "schema_version": 1,
                "event_id": f"evt-{number}",
                "customer_id": KEY[0],
                "device_id": KEY[1],
                **document,
            }
        )
        for number, document in enumerate(events)
    ]
    return coalesce(documents, at(24 * 60), timedelta(minutes=5))


def heartbeat(minutes: float, **fields: Any) -> dict[str, Any]:
    return {"type": "heartbeat", "occurred_at": at(minutes).isoformat(), **fields}


def written(**fields: Any) -> Remembered:
    values: dict[str, Any] = {
        "last_seen_at": S,
        "user_id": "alice",
        "device_kind": "business",
        "agent_version": "5.3.1",
        "protected": True,
        **fields,
    }
    return Remembered(**values)


def device_change(*events: dict[str, Any]) -> DeviceChange:
    return fold(*events).devices[KEY]


def memory_with(remembered: Remembered, capacity: int = 10) -> LastSeenMemory:
    memory = LastSeenMemory(capacity)
    memory.remember(KEY, remembered, memory.generation)
    return memory


@pytest.mark.parametrize(
    "events",
    [
        [heartbeat(1)],
        [heartbeat(14.99, user_id="alice")],
        [heartbeat(5, user_id="alice", device_kind="business", agent_version="5.3.1")],
        [heartbeat(0)],  # a redelivery of the written one
        [heartbeat(2), heartbeat(9, user_id="alice")],
    ],
)
def test_a_heartbeat_that_only_moves_last_seen_within_the_precision_is_skippable(
    events: list[dict[str, Any]],
) -> None:
    assert is_skippable(device_change(*events), written(), PRECISION)


@pytest.mark.parametrize(
    ("events", "remembered"),
    [
        ([heartbeat(15)], written()),  # exactly the precision: written
        ([heartbeat(1), heartbeat(20)], written()),
        ([heartbeat(-1)], written()),  # older than the written last seen (first seen)
        ([heartbeat(1)], written(protected=False)),  # after an uninstall: a reinstall
        ([heartbeat(1, user_id="bob")], written()),
        ([heartbeat(1, user_id=None)], written()),  # unassigned explicitly
        ([heartbeat(1, user_id="alice")], written(user_id=None)),
        ([heartbeat(1, device_kind="personal")], written()),
        ([heartbeat(1, device_kind="business")], written(device_kind=None)),
        ([heartbeat(1, agent_version="5.4.0")], written()),
        ([{"type": "uninstall", "occurred_at": at(1).isoformat()}], written()),
        (
            [
                {
                    "type": "install",
                    "occurred_at": at(1).isoformat(),
                    "user_id": "alice",
                    "device_kind": "business",
                    "hostname": "h",
                    "os": "o",
                }
            ],
            written(),
        ),
    ],
)
def test_anything_else_a_heartbeat_carries_is_not_skippable(
    events: list[dict[str, Any]], remembered: Remembered
) -> None:
    assert not is_skippable(device_change(*events), remembered, PRECISION)


def test_a_skipped_change_is_kept_back_with_its_user_change() -> None:
    memory = memory_with(written())
    changes = fold(heartbeat(3, user_id="alice"))

    skipped = keep_back_unchanged(changes, memory, PRECISION)

    assert skipped == {KEY}
    assert changes.devices == {}
    assert changes.users == {}
    remembered = memory.get(KEY)
    assert remembered is not None
    assert (remembered.seen_since, remembered.user_reported_since) == (at(3), at(3))


def test_a_user_change_that_moves_past_the_precision_is_written() -> None:
    """Another device of the same user, heard later, keeps the user's change."""
    memory = memory_with(written())
    changes = fold(heartbeat(3, user_id="alice"))
    other = fold(
        {
            "type": "heartbeat",
            "occurred_at": at(40).isoformat(),
            "user_id": "alice",
            "device_id": "dev-2",
        }
    )
    changes.devices.update(other.devices)
    changes.users[("cust-1", "alice")].last_seen_at = at(40)

    assert keep_back_unchanged(changes, memory, PRECISION) == {KEY}
    assert changes.users[("cust-1", "alice")].last_seen_at == at(40)


def test_the_next_write_carries_what_was_kept_back() -> None:
    """A late uninstall older than a skipped heartbeat: the device stays installed, as if
    the heartbeat had been written."""
    memory = memory_with(written())
    keep_back_unchanged(fold(heartbeat(3), heartbeat(5, user_id="alice")), memory, PRECISION)
    changes = fold({"type": "uninstall", "occurred_at": at(4).isoformat()})

    assert keep_back_unchanged(changes, memory, PRECISION) == set()

    change = changes.devices[KEY]
    assert change.last_present_at == at(5)
    assert change.last_uninstalled_at == at(4)
    assert change.last_seen_at == at(5)
    assert (change.user_id, change.user_reported_at) == ("alice", at(5))
    assert changes.users[("cust-1", "alice")].last_seen_at == at(5)
    remembered = memory.get(KEY)
    assert remembered is not None
    assert remembered.seen_since is None


def test_a_kept_back_user_report_loses_to_a_newer_one_and_wins_over_an_older_one() -> None:
    memory = memory_with(written())
    keep_back_unchanged(fold(heartbeat(5, user_id="alice")), memory, PRECISION)
    older = fold(heartbeat(-2, user_id="bob"))  # processed later, happened earlier
    keep_back_unchanged(older, memory, PRECISION)
    assert older.devices[KEY].user_id == "alice"

    memory = memory_with(written())
    keep_back_unchanged(fold(heartbeat(5, user_id="alice")), memory, PRECISION)
    newer = fold(heartbeat(6, user_id="bob"))
    keep_back_unchanged(newer, memory, PRECISION)
    assert newer.devices[KEY].user_id == "bob"


def test_merge_ties_go_to_the_later_message() -> None:
    later = device_change(heartbeat(5, user_id="bob", device_kind="personal"))
    earlier = device_change(heartbeat(5, user_id="alice", device_kind="business"))

    merge_earlier(later, earlier)

    assert (later.user_id, later.device_kind) == ("bob", "personal")


def test_the_memory_is_bounded_and_drops_new_devices_when_full() -> None:
    memory = LastSeenMemory(2)
    for number in range(3):
        memory.remember(("c", f"d{number}"), written(), memory.generation)

    assert len(memory) == 2
    assert memory.get(("c", "d2")) is None
    memory.remember(("c", "d0"), written(last_seen_at=at(20)), memory.generation)
    remembered = memory.get(("c", "d0"))
    assert remembered is not None
    assert remembered.last_seen_at == at(20)


def test_forgetting_empties_it_and_a_write_begun_before_no_longer_fills_it() -> None:
    memory = memory_with(written())
    began = memory.generation

    memory.forget_all()
    memory.remember(KEY, written(), began)

    assert len(memory) == 0
    memory.remember(KEY, written(), memory.generation)
    assert len(memory) == 1
    memory.forget([KEY])
    assert len(memory) == 0


def test_a_replica_that_forgot_writes_the_next_heartbeat() -> None:
    memory = memory_with(written())
    memory.forget_all()
    changes = fold(heartbeat(1))

    assert keep_back_unchanged(changes, memory, PRECISION) == set()
    assert KEY in changes.devices


@pytest.mark.parametrize(
    ("counts", "assigned", "problem"),
    [
        ((4, 4), [(TOPICS[0], 0), (TOPICS[1], 0), (TOPICS[0], 3), (TOPICS[1], 3)], None),
        ((4, 4), [], None),
        ((4, 8), [(TOPICS[0], 0), (TOPICS[1], 0)], "partition_counts_differ"),
        ((4, None), [(TOPICS[0], 0)], "partition_count_unknown"),
        ((4, 4), [(TOPICS[0], 0), (TOPICS[1], 1)], "partitions_not_assigned_together"),
        ((4, 4), [(TOPICS[0], 0)], "partitions_not_assigned_together"),
    ],
)
def test_heartbeats_are_skipped_only_when_both_topics_are_co_partitioned_and_assigned_together(
    counts: tuple[int | None, int | None], assigned: list[tuple[str, int]], problem: str | None
) -> None:
    assert co_partitioning_problem(TOPICS, counts, assigned) == problem


def test_bytes_per_remembered_device() -> None:
    """Measured with tracemalloc over 100,000 devices: the entries, the table and its slack,
    with a pending change for every device (the steady state); the keys and users as decoded
    from messages are not kept. The figure is in docs/ingestion.md."""
    devices = 100_000
    keys = [(f"customer-{n % 100:04d}", f"device-{n:08d}-abcdef") for n in range(devices)]
    users = [f"user-{n:08d}@customer.example" for n in range(devices)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    memory = LastSeenMemory(devices)
    for key, user in zip(keys, users, strict=True):
        memory.remember(key, written(user_id=user, last_seen_at=at(0)), memory.generation)
    for start in range(0, devices, 5_000):
        changes = BatchChanges()
        for key, user in zip(
            keys[start : start + 5_000], users[start : start + 5_000], strict=True
        ):
            change = changes.devices[key] = DeviceChange(key[0], key[1], at(1), at(1), at(1))
            change.user_id, change.user_reported_at = user, at(1)
        keep_back_unchanged(changes, memory, PRECISION)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    per_device = grown / devices
    print(f"bytes per remembered device: {per_device:.0f}")
    assert len(memory) == devices
    assert per_device < MAX_BYTES_PER_DEVICE
    remembered = memory.get(keys[-1])
    assert remembered is not None
    assert (remembered.user_id, remembered.seen_since) == (users[-1], at(1))


def test_times_survive_packing_to_the_microsecond() -> None:
    rng = random.Random(17)
    memory = LastSeenMemory(1_000)
    for number in range(1_000):
        seen = datetime(1990, 1, 1, tzinfo=UTC) + timedelta(
            microseconds=rng.randrange(0, 100 * 365 * 86_400 * 10**6)
        )
        key = ("c", f"d{number}")
        memory.remember(key, written(last_seen_at=seen), memory.generation)
        change = DeviceChange("c", key[1], seen, seen + timedelta(microseconds=1))
        memory.keep_back(memory.find(key), change)
        remembered = memory.get(key)
        assert remembered is not None
        assert remembered.last_seen_at == seen
        assert remembered.seen_since == seen + timedelta(microseconds=1)


def test_report_times_that_differ_from_the_last_seen_are_kept_exactly() -> None:
    """A heartbeat naming its user, then a later one naming none: the user's report time is
    the first one's, not the kept-back last seen."""
    memory = memory_with(written())
    keep_back_unchanged(
        fold(heartbeat(2, user_id="alice", device_kind="business")), memory, PRECISION
    )
    keep_back_unchanged(fold(heartbeat(4)), memory, PRECISION)
    remembered = memory.get(KEY)
    assert remembered is not None
    assert (remembered.seen_since, remembered.user_reported_since) == (at(4), at(2))
    assert (remembered.kind_reported_since, remembered.unattributed_since) == (at(2), at(4))

    changes = fold({"type": "uninstall", "occurred_at": at(6).isoformat()})
    keep_back_unchanged(changes, memory, PRECISION)
    change = changes.devices[KEY]
    assert (change.user_id, change.user_reported_at) == ("alice", at(2))
    assert (change.device_kind, change.kind_reported_at) == ("business", at(2))
    assert change.last_present_at == at(4)
    kept = memory.get(KEY)
    assert kept is not None
    assert (kept.seen_since, kept.user_reported_since, kept.unattributed_since) == (None,) * 3


def test_a_moved_user_and_versions_beyond_the_codes_are_remembered_exactly() -> None:
    memory = LastSeenMemory(70_000)
    for number in range(66_000):  # more distinct agent versions than the codes hold
        key = ("c", f"d{number}")
        memory.remember(key, written(agent_version=f"v{number}"), memory.generation)
    for number in (0, 65_999):
        remembered = memory.get(("c", f"d{number}"))
        assert remembered is not None
        assert remembered.agent_version == f"v{number}"
    memory.remember(
        ("c", "d7"), written(user_id="bob", device_kind=None, agent_version="v7"), memory.generation
    )
    memory.remember(("c", "d8"), written(user_id=None), memory.generation)
    moved, unassigned = memory.get(("c", "d7")), memory.get(("c", "d8"))
    assert moved is not None
    assert unassigned is not None
    assert (moved.user_id, moved.device_kind, moved.agent_version) == ("bob", None, "v7")
    assert unassigned.user_id is None


def test_forgetting_some_devices_keeps_what_the_others_kept_back() -> None:
    memory = LastSeenMemory(5_000)
    keys = [(f"c{n % 7}", f"d{n}") for n in range(5_000)]
    for key in keys:
        memory.remember(key, written(), memory.generation)
        memory.keep_back(memory.find(key), DeviceChange(*key, at(3), at(3)))
    memory.forget(keys[:4_000])  # enough to compact

    assert len(memory) == 1_000
    assert memory.get(keys[0]) is None
    kept = memory.take_kept_back()
    assert set(kept.devices) == set(keys[4_000:])
    assert {change.last_seen_at for change in kept.devices.values()} == {at(3)}
    memory.remember(keys[0], written(), memory.generation)
    assert len(memory) == 1_001


def test_a_user_named_only_by_a_skippable_device_keeps_its_device_written() -> None:
    """Within one batch the device named bob, then alice again (the remembered user): bob's
    change cannot be dropped, and a user change is written with a device of its customer
    (the write and the split by customer rely on it), so the device is written."""
    memory = memory_with(written())
    changes = fold(heartbeat(2, user_id="bob"), heartbeat(3, user_id="alice"))
    assert is_skippable(changes.devices[KEY], written(), PRECISION)

    assert keep_back_unchanged(changes, memory, PRECISION) == set()

    assert KEY in changes.devices
    assert ("cust-1", "bob") in changes.users
    assert changes.split_by_customer(2)  # every user change has its customer's devices


def test_the_packed_classification_is_the_rule_of_is_skippable_and_is_refresh() -> None:
    """`LastSeenMemory.classify` reads the packed entry; `is_skippable` and `is_refresh` state
    the rule. Random changes against random remembered devices: the same answer."""
    rng = random.Random(3)
    users, kinds, versions = ["alice", "bob", None], ["business", "personal", None], ["5.3.1", None]
    memory = LastSeenMemory(2_000)
    precision_micros = PRECISION // timedelta(microseconds=1)
    answers = set()
    for number in range(2_000):
        key = ("c", f"d{number}")
        remembered = written(
            user_id=rng.choice(users),
            device_kind=rng.choice(kinds),
            agent_version=rng.choice(versions),
            protected=rng.random() < 0.8,
            last_seen_at=at(rng.choice([0, 0.5])),
        )
        memory.remember(key, remembered, memory.generation)
        seen = at(rng.choice([-1, 0, 0.5, 3, 14.99, 15, 15.5, 20]))
        change = DeviceChange("c", key[1], seen, seen, seen)
        if rng.random() < 0.3:
            change.first_seen_at = at(rng.choice([-2, 0, 1]))
            change.last_seen_at = max(change.first_seen_at, seen)
        if rng.random() < 0.7:
            change.user_id, change.user_reported_at = rng.choice(users), seen
        if rng.random() < 0.5:
            change.device_kind, change.kind_reported_at = rng.choice(kinds[:2]), seen
        if rng.random() < 0.5:
            change.agent_version = rng.choice(["5.3.1", "6.0"])
            change.agent_version_reported_at = seen
        if rng.random() < 0.1:
            change.last_uninstalled_at = seen
        if rng.random() < 0.1:
            change.details_reported_at, change.hostname = seen, "h"
        expected = (
            SKIPPABLE
            if is_skippable(change, remembered, PRECISION)
            else REFRESH
            if is_refresh(change, remembered)
            else WRITE
        )
        answers.add(expected)
        assert memory.classify(memory.find(key), change, precision_micros) == expected
    assert answers == {SKIPPABLE, REFRESH, WRITE}

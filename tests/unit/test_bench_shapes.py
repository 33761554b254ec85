"""The benchmark's steady-state and first-sighting workloads, and the peer's fold (pure: no
broker, no database)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest

from scripts.bench.code_under_test import UnderTest
from scripts.bench.peer import newest_per_device, upsert_arguments
from scripts.bench.shapes import build_workload, first_sighting_shape, full_shapes, steady_shape
from worker.sim import fleet

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def simulated_fleet(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's simulator, as `import_worker_modules` would set it from a snapshot."""
    for name in ("build_fleet", "agent_event", "encode", "heartbeat_rounds", "device_bursts"):
        monkeypatch.setattr(UnderTest, name, getattr(fleet, name), raising=False)


def decoded(messages: list[tuple[bytes, bytes]]) -> list[dict[str, object]]:
    return [orjson.loads(value) for _, value in messages]


def test_the_full_steady_state_is_200000_devices_of_100_customers_for_12_rounds() -> None:
    steady = full_shapes()["steady"]
    assert (steady.devices, steady.customers, steady.heartbeats_per_device) == (200_000, 100, 12)
    assert steady.stored_beforehand
    assert steady.uninstall_every == 0


def test_a_smaller_steady_state_keeps_at_least_one_device_a_customer() -> None:
    assert steady_shape(5_000, 3).devices == 5_000
    small = steady_shape(40, 3)
    assert (small.customers, small.devices_per_customer) == (40, 1)


def test_the_steady_fleet_is_stored_beforehand_and_heartbeats_round_robin_5_minutes_apart() -> None:
    workload = build_workload(steady_shape(20, 4, customers=2), NOW)
    installs = decoded(workload.stored_beforehand)
    assert [event["type"] for event in installs] == ["install"] * 20
    assert workload.lifecycle == []  # nothing changes but last seen: no uninstalls
    assert workload.total == 80 == len(workload.heartbeats)
    assert (workload.devices, workload.lifecycle_events) == (20, 20)
    beats = decoded(workload.heartbeats)
    assert {event["type"] for event in beats} == {"heartbeat"}
    times = [datetime.fromisoformat(str(event["occurred_at"])) for event in beats]
    for round_number in range(4):
        in_round = beats[round_number * 20 : (round_number + 1) * 20]
        # Every device once per round, in the same order each round.
        assert [e["device_id"] for e in in_round] == [e["device_id"] for e in installs]
        assert {times[round_number * 20 + i] for i in range(20)} == {
            times[0] + timedelta(minutes=5) * round_number
        }
    assert max(datetime.fromisoformat(str(e["occurred_at"])) for e in installs) < times[0]
    assert max(times) < NOW


def test_first_sightings_are_one_heartbeat_of_each_new_device_with_its_kind() -> None:
    workload = build_workload(first_sighting_shape(30, customers=3), NOW)
    assert workload.stored_beforehand == []
    assert workload.lifecycle == []
    beats = decoded(workload.heartbeats)
    assert len({(e["customer_id"], e["device_id"]) for e in beats}) == 30 == len(beats)
    assert {e["device_kind"] for e in beats} == {"business", "personal"}
    assert workload.lifecycle_events == 0


def test_the_peer_keeps_the_newest_time_of_each_device_whatever_the_order_and_offset() -> None:
    def event(device: str, occurred_at: str) -> bytes:
        return orjson.dumps({"customer_id": "c", "device_id": device, "occurred_at": occurred_at})

    newest = newest_per_device(
        [
            event("a", "2026-12-03T10:05:00Z"),
            event("a", "2026-12-03T10:00:00Z"),  # older, later in the batch
            event("b", "2026-12-03T11:00:00+02:00"),  # 09:00 UTC
            event("b", "2026-12-03T09:30:00Z"),
            event("a", "2026-12-03T12:04:00+02:00"),  # 10:04 UTC: older than 10:05
        ]
    )
    assert newest == {
        ("c", "a"): datetime(2026, 12, 3, 10, 5, tzinfo=UTC),
        ("c", "b"): datetime(2026, 12, 3, 9, 30, tzinfo=UTC),
    }
    assert upsert_arguments(newest) == (
        ["c", "c"],
        ["a", "b"],
        [datetime(2026, 12, 3, 10, 5, tzinfo=UTC), datetime(2026, 12, 3, 9, 30, tzinfo=UTC)],
    )

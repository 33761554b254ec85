"""The fault suite's own parts, without services: the stream generator, the model of what must
be stored, the license rules and the billing check. A wrong model would blame the worker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from tests.faults.invariants import Findings, check_license_events
from tests.faults.model import TimeRange, build_model
from tests.faults.observe import Stored, TopicRecord
from tests.faults.rules import DeviceState, expected_licenses
from tests.faults.stream import OVERSIZED_BYTES, AgentSignal, Poison, StreamShape, generate_stream

BASE = datetime(2026, 12, 1, tzinfo=UTC)
WINDOW = timedelta(days=30)


def signal(event_type: str, hours: float, **fields: Any) -> AgentSignal:
    values: dict[str, Any] = {
        "event_id": f"{event_type}-{hours}",
        "type": event_type,
        "customer_id": "c",
        "device_id": "d",
        "occurred_at": BASE + timedelta(hours=hours),
        "names_user": event_type != "uninstall",
        "user_id": "alice" if event_type != "uninstall" else None,
        **fields,
    }
    return AgentSignal(**values)


def test_the_stream_is_deterministic_and_has_the_promised_shape() -> None:
    first = generate_stream(7, StreamShape(events=5000), BASE)
    again = generate_stream(7, StreamShape(events=5000), BASE)
    assert [m.value for m in first.messages] == [m.value for m in again.messages]
    valid = len(first.messages) - len(first.poison)
    assert 0.03 < first.duplicates / valid < 0.07
    assert 0.05 < first.late / valid < 0.10
    oversized = [m for m in first.poison if m.poison is Poison.OVERSIZED]
    assert len(oversized[0].value) == OVERSIZED_BYTES
    assert {s.type for s in first.signals} == {"heartbeat", "install", "uninstall"}
    assert any(not s.names_user and s.type == "heartbeat" for s in first.signals)
    assert any(s.future for s in first.signals)


def test_a_late_heartbeat_older_than_the_uninstall_does_not_reinstall() -> None:
    signals = [
        signal("install", 0, device_kind="personal", hostname="h", os="android"),
        signal("uninstall", 10),
        signal("heartbeat", 5),  # delivered last, but older than the uninstall
    ]
    device = build_model(signals, TimeRange(BASE, BASE)).devices[("c", "d")]
    assert not device.protected
    assert device.last_seen_at == TimeRange.exactly(BASE + timedelta(hours=10))
    assert device.kind == "personal"


def test_a_heartbeat_after_the_uninstall_means_reinstalled() -> None:
    signals = [signal("install", 0, device_kind="business"), signal("uninstall", 10)]
    signals.append(signal("heartbeat", 11))
    assert build_model(signals, TimeRange(BASE, BASE)).devices[("c", "d")].protected


def test_a_future_clock_is_known_only_as_the_clamp_range() -> None:
    clamp = TimeRange(BASE + timedelta(days=1), BASE + timedelta(days=1, hours=1))
    signals = [signal("install", 0, device_kind="business")]
    signals.append(signal("heartbeat", 24 * 30, future=True))
    model = build_model(signals, clamp)
    assert model.devices[("c", "d")].last_seen_at == clamp
    assert model.users[("c", "alice")].last_seen_at == clamp


def test_a_nameless_signal_counts_for_the_devices_user() -> None:
    signals = [signal("install", 0, device_kind="business"), signal("uninstall", 10)]
    signals.append(signal("heartbeat", 3, names_user=False, user_id=None))
    user = build_model(signals, TimeRange(BASE, BASE)).users[("c", "alice")]
    assert user.last_seen_at == TimeRange.exactly(BASE + timedelta(hours=10))
    assert user.first_seen_at == TimeRange.exactly(BASE)


def device(device_id: str, kind: str | None, first_hours: float, **changes: Any) -> DeviceState:
    values: dict[str, Any] = {
        "customer_id": "c",
        "device_id": device_id,
        "user_id": "alice",
        "kind": kind,
        "protected": True,
        "first_seen_at": BASE + timedelta(hours=first_hours),
        "last_seen_at": BASE + timedelta(days=2),
        **changes,
    }
    return DeviceState(**values)


def test_the_latest_first_seen_of_a_kind_is_over_the_allowance_ties_by_device_id() -> None:
    devices = [
        device("p-b", "personal", 1),
        device("p-a", "personal", 1),
        device("p-c", "personal", 1),
        device("laptop", None, 0),  # never reported: business
        device("desk", "business", 5),
        device("old", "personal", 0, protected=False),
    ]
    licenses = expected_licenses(devices, {"c": "user"}, BASE + timedelta(days=3), WINDOW)
    assert licenses == {
        ("c", "user", "alice"): "user",
        ("c", "device", "p-c"): "over_allowance",
        ("c", "device", "desk"): "over_allowance",
    }


def test_unassigned_silent_and_device_model_devices() -> None:
    now = BASE + timedelta(days=3)
    devices = [
        device("free", "business", 0, user_id=None),
        device("silent", "business", 0, user_id=None, last_seen_at=now - WINDOW),
    ]
    assert expected_licenses(devices, {"c": "user"}, now, WINDOW) == {
        ("c", "device", "free"): "unassigned"
    }
    assert expected_licenses(devices[:1], {"c": "device"}, now, WINDOW) == {
        ("c", "device", "free"): "device_model"
    }


def license_event(offset: int, event_type: str, event_id: str) -> TopicRecord:
    body = {"event_id": event_id, "type": event_type, "customer_id": "c"}
    body |= {"subject_type": "device", "subject_id": "d", "reason": "r", "effective_at": "t"}
    return TopicRecord(0, offset, b"c", orjson.dumps(body), {})


def test_billing_sees_a_released_license_when_a_reallocation_reused_an_event_id() -> None:
    """The outbox drops a second allocation with the id of the first: billing's last
    event is then the release while the license is active."""
    stored = Stored([], [], [], [{"customer_id": "c", "subject_type": "device",
                                  "subject_id": "d", "active": True}], [])  # fmt: skip
    events = [
        license_event(0, "license.allocated", "a1"),
        license_event(1, "license.released", "r1"),
        license_event(2, "license.allocated", "a1"),  # a re-publication: de-duplicated
    ]
    findings = Findings()
    check_license_events(stored, events, findings)
    [violation] = findings.failed
    assert "stored active" in violation.examples[0]
    assert "released(r @ t)" in violation.examples[0]


def test_billing_sees_a_reallocation_effective_before_the_previous_release() -> None:
    """The black-box finding of issue #18: released on Feb 15, re-allocated from Feb 2."""
    stored = Stored([], [], [], [{"customer_id": "c", "subject_type": "device",
                                  "subject_id": "d", "active": True}], [])  # fmt: skip
    times = ("2026-02-01T00:00:00+00:00", "2026-02-15T00:00:00+00:00", "2026-02-02T00:00:00+00:00")
    events = []
    for number, (event_type, at) in enumerate(
        zip(("license.allocated", "license.released", "license.allocated"), times, strict=True)
    ):
        body: dict[str, object] = {"event_id": f"e{number}", "type": event_type}
        body |= {"customer_id": "c"}
        body |= {"subject_type": "device", "subject_id": "d", "reason": "r"}
        body |= {"effective_at": at, "sequence": number + 1}
        events.append(TopicRecord(0, number, b"c", orjson.dumps(body), {}))
    findings = Findings()
    check_license_events(stored, events, findings)
    [violation] = findings.failed
    assert violation.invariant == "billing: a subject's intervals are ordered and never overlap"

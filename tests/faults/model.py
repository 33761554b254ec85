"""What the worker must have stored after the whole stream, computed from the generated
signals alone (no worker code): the contract's rules, read independently.

- A device's fields are those of its newest report by event time: its user (heartbeats and
  installs name it; an explicit null unassigns), kind (installs, heartbeats that carry one),
  host name and OS (installs), agent version (heartbeats and installs). First and last seen
  are the oldest and newest of all its signals (uninstalls included).
- Protected: never uninstalled, or present (heartbeat, install) after its newest uninstall.
- A user's first seen: the signals that named the user; last seen: those, and the signals
  of the user's devices that named nobody (uninstalls, heartbeats without `user_id`: they
  count for the device's user).
- Agent clocks ahead of ours are stored clamped, at the time the worker received them (plus
  its tolerance): the model knows such a time only as a range (`TimeRange`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from tests.faults.stream import AgentSignal


@dataclass(frozen=True, slots=True)
class TimeRange:
    """An expected time: exact (low == high), or the span a clamped time falls into."""

    low: datetime
    high: datetime

    @classmethod
    def exactly(cls, at: datetime) -> TimeRange:
        return cls(at, at)

    def contains(self, value: datetime | None) -> bool:
        return value is not None and self.low <= value <= self.high

    def __str__(self) -> str:
        if self.low == self.high:
            return self.low.isoformat()
        return f"[{self.low.isoformat()} .. {self.high.isoformat()}]"


@dataclass(frozen=True, slots=True)
class ExpectedDevice:
    customer_id: str
    device_id: str
    user_id: str | None
    kind: str | None
    hostname: str | None
    os: str | None
    agent_version: str | None
    first_seen_at: TimeRange
    last_seen_at: TimeRange
    protected: bool


@dataclass(frozen=True, slots=True)
class ExpectedUser:
    customer_id: str
    user_id: str
    email: str | None
    first_seen_at: TimeRange
    last_seen_at: TimeRange


@dataclass(frozen=True, slots=True)
class ExpectedLifecycle:
    device_id: str
    event_type: str
    occurred_at: datetime


@dataclass(frozen=True, slots=True)
class Model:
    devices: dict[tuple[str, str], ExpectedDevice]
    users: dict[tuple[str, str], ExpectedUser]
    lifecycle: dict[tuple[str, str], ExpectedLifecycle]


def build_model(signals: Iterable[AgentSignal], clamped: TimeRange) -> Model:
    """`signals`: every distinct valid event; `clamped`: where clamped times may fall."""
    by_device: dict[tuple[str, str], list[AgentSignal]] = defaultdict(list)
    for signal in signals:
        by_device[(signal.customer_id, signal.device_id)].append(signal)
    devices = {key: _device(events, clamped) for key, events in by_device.items()}
    return Model(devices, _users(by_device, clamped), _lifecycle(by_device))


def _when(signal: AgentSignal, clamped: TimeRange) -> TimeRange:
    return clamped if signal.future else TimeRange.exactly(signal.occurred_at)


def _newest(events: Iterable[AgentSignal]) -> AgentSignal | None:
    # Event times are unique per device (the generator sees to it), so there is no tie; a
    # clamped time stays the newest, as the agent's own time was.
    return max(events, key=lambda s: s.occurred_at, default=None)


def _device(events: list[AgentSignal], clamped: TimeRange) -> ExpectedDevice:
    first, last = min(events, key=lambda s: s.occurred_at), _newest(events)
    assert last is not None
    present = [s for s in events if s.type != "uninstall"]
    uninstalls = [s for s in events if s.type == "uninstall"]
    naming = _newest(s for s in present if s.names_user)
    kind = _newest(s for s in present if s.device_kind is not None)
    install = _newest(s for s in events if s.type == "install")
    version = _newest(s for s in present if s.agent_version is not None)
    newest_present, newest_uninstall = _newest(present), _newest(uninstalls)
    protected = newest_uninstall is None or (
        newest_present is not None and newest_present.occurred_at > newest_uninstall.occurred_at
    )
    return ExpectedDevice(
        customer_id=first.customer_id,
        device_id=first.device_id,
        user_id=naming.user_id if naming else None,
        kind=kind.device_kind if kind else None,
        hostname=install.hostname if install else None,
        os=install.os if install else None,
        agent_version=version.agent_version if version else None,
        first_seen_at=_when(first, clamped),
        last_seen_at=_when(last, clamped),
        protected=protected,
    )


def _users(
    by_device: dict[tuple[str, str], list[AgentSignal]], clamped: TimeRange
) -> dict[tuple[str, str], ExpectedUser]:
    credited: dict[tuple[str, str], list[AgentSignal]] = defaultdict(list)
    named: dict[tuple[str, str], list[AgentSignal]] = defaultdict(list)
    for (customer_id, _), events in by_device.items():
        owners = {s.user_id for s in events if s.names_user}
        for signal in events:
            if signal.names_user and signal.user_id is not None:
                named[(customer_id, signal.user_id)].append(signal)
                credited[(customer_id, signal.user_id)].append(signal)
            elif not signal.names_user:
                # The generator sends nameless signals (uninstalls, heartbeats without
                # user_id) only for devices whose user never changes.
                assert len(owners) == 1, f"nameless signal of a device with users {owners}"
                owner = next(iter(owners))
                if owner is not None:
                    credited[(customer_id, owner)].append(signal)
    users = {}
    for key, events in named.items():
        first = min(events, key=lambda s: s.occurred_at)
        last = max(credited[key], key=lambda s: s.occurred_at)
        profile = _newest(s for s in events if s.type == "install" and s.email is not None)
        users[key] = ExpectedUser(
            customer_id=key[0],
            user_id=key[1],
            email=profile.email if profile else None,
            first_seen_at=_when(first, clamped),
            last_seen_at=_when(last, clamped),
        )
    return users


def _lifecycle(
    by_device: dict[tuple[str, str], list[AgentSignal]],
) -> dict[tuple[str, str], ExpectedLifecycle]:
    return {
        (signal.customer_id, signal.event_id): ExpectedLifecycle(
            signal.device_id, signal.type, signal.occurred_at
        )
        for events in by_device.values()
        for signal in events
        if signal.type != "heartbeat"
    }

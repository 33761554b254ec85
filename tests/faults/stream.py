"""A known stream of agent events: a seeded, deterministic fleet (customers, users with
business and personal devices, unassigned devices, installs, heartbeats, uninstalls,
reinstalls, moves between users), delivered with duplicates, late events and poison messages.

The generator keeps the truth (`AgentSignal`) beside every message, so the model
(`tests/faults/model.py`) can compute what the worker must have stored. Two constraints keep
that truth independent of the order the replicas happen to process messages in:
- event times are unique per device, so "the newest report wins" never meets a tie;
- an uninstall (the only signal that names no user, and is credited to the device's user of
  the moment) only happens on devices whose user never changes and whose install, which names
  the user, is on the same partition before it and never delayed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import orjson

DAY = 86_400
# Every ordinary event lies in [base - 20 days, base - 10 minutes]; stale devices in
# [base - 45 days, base - 35 days]; agent clocks ahead send base + 1..3 days. With a 30-day
# release window nothing crosses the boundary while the suite runs (minutes to hours).
ACTIVE_SPAN = (-20 * DAY, -600)
STALE_SPAN = (-45 * DAY, -35 * DAY)
FUTURE_SPAN = (1 * DAY, 3 * DAY)
OVERSIZED_BYTES = 1_048_500


class Topic(StrEnum):
    HEARTBEAT = "heartbeat"
    LIFECYCLE = "lifecycle"


class Poison(StrEnum):
    INVALID_JSON = "invalid_json"
    SCHEMA_VIOLATION = "schema_violation"
    OVERSIZED = "oversized"


@dataclass(frozen=True, slots=True)
class AgentSignal:
    """One valid agent event as generated: what the agent said, not what the worker stored."""

    event_id: str
    type: str  # heartbeat, install, uninstall
    customer_id: str
    device_id: str
    occurred_at: datetime
    names_user: bool
    user_id: str | None = None
    device_kind: str | None = None
    hostname: str | None = None
    os: str | None = None
    agent_version: str | None = None
    email: str | None = None
    display_name: str | None = None
    # The agent's clock is ahead: the worker stores the time it received it (clamped).
    future: bool = False

    @property
    def topic(self) -> Topic:
        return Topic.HEARTBEAT if self.type == "heartbeat" else Topic.LIFECYCLE

    @property
    def key(self) -> bytes:
        return f"{self.customer_id}:{self.device_id}".encode()

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "schema_version": 1,
            "event_id": self.event_id,
            "type": self.type,
            "customer_id": self.customer_id,
            "device_id": self.device_id,
            "occurred_at": self.occurred_at.isoformat().replace("+00:00", "Z"),
        }
        if self.names_user:
            body["user_id"] = self.user_id
        if self.agent_version is not None:
            body["agent_version"] = self.agent_version
        if self.device_kind is not None:
            body["device_kind"] = self.device_kind
        if self.type == "install":
            body["hostname"], body["os"] = self.hostname, self.os
            if self.email is not None:
                body["user"] = {"email": self.email, "display_name": self.display_name}
        return body


@dataclass(frozen=True, slots=True)
class Message:
    """One message as produced, in delivery order."""

    topic: Topic
    key: bytes
    value: bytes
    signal: AgentSignal | None = None
    poison: Poison | None = None
    duplicate: bool = False
    late: bool = False


@dataclass(frozen=True, slots=True)
class Customer:
    customer_id: str
    license_model: str  # user or device


@dataclass(slots=True)
class Stream:
    base: datetime
    customers: list[Customer]
    messages: list[Message]
    signals: list[AgentSignal] = field(default_factory=list)  # every distinct valid event

    @property
    def duplicates(self) -> int:
        return sum(message.duplicate for message in self.messages)

    @property
    def late(self) -> int:
        return sum(message.late for message in self.messages)

    @property
    def poison(self) -> list[Message]:
        return [message for message in self.messages if message.poison is not None]


@dataclass(frozen=True, slots=True)
class StreamShape:
    events: int = 20_000
    duplicate_share: float = 0.05
    late_share: float = 0.07
    poison: tuple[Poison, ...] = tuple(Poison)


@dataclass(slots=True)
class _Device:
    customer_id: str
    device_id: str
    user_id: str | None
    kind: str
    stale: bool = False
    installed: bool = True  # False: the install was lost, first seen by heartbeat
    uninstall: bool = False
    # "install", or "heartbeat" (minutes after the uninstall, like an agent upgrade)
    reinstall: str | None = None
    move_to: str | None = None  # a user id, or "" for unassigned
    kind_change: bool = False
    future: bool = False
    silent_kind: bool = False  # heartbeats never say the kind (with a lost install: NULL)
    # Heartbeats after the first leave user_id out (credited to the device's user).
    anonymous_heartbeats: bool = False
    # Every heartbeat says the device's kind (else about one in five does).
    kind_in_heartbeats: bool = False
    # A bad upgrade: uninstalled and back minutes later, twice, hours apart.
    flapper: bool = False
    # All of a user's devices installed at the same second (first seen ties).
    start: int | None = None


class _Ids:
    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def event_id(self) -> str:
        return f"{self._rng.getrandbits(128):032x}"


def generate_stream(seed: int, shape: StreamShape, base: datetime) -> Stream:
    """The whole stream, deterministic for (seed, shape, base)."""
    rng = random.Random(seed)
    customers = _customers(shape.events)
    fleet = _fleet(rng, customers, shape.events)
    per_device = max(4, round(shape.events / (1 + shape.duplicate_share) / len(fleet)))
    ids = _Ids(rng)
    signals = [s for device in fleet for s in _device_signals(rng, ids, device, per_device, base)]
    messages = _deliver(rng, signals, shape, len(fleet))
    return Stream(base, customers, messages, signals)


def _customers(events: int) -> list[Customer]:
    count = max(4, min(16, events // 5000))
    return [
        Customer(f"fc{index:02d}", "device" if index == 0 else "user") for index in range(count)
    ]


def _fleet(rng: random.Random, customers: list[Customer], events: int) -> list[_Device]:
    """Users with one to five devices (the first business, then mostly personal, so some go
    over the allowance), unassigned and stale devices, lost installs, uninstalls, moves."""
    target = max(40, events // 45)
    fleet: list[_Device] = []
    users: dict[str, list[str]] = {c.customer_id: [] for c in customers}
    serial = 0
    while len(fleet) < target:
        customer = customers[len(fleet) % len(customers)].customer_id
        serial += 1
        if rng.random() < 0.1:
            fleet.append(_Device(customer, f"d{serial:06d}", None, rng.choice(_KINDS)))
            continue
        user = f"u{serial:06d}@{customer}.example"
        users[customer].append(user)
        count = rng.choices([1, 2, 3, 4, 5], weights=[30, 30, 20, 15, 5])[0]
        # Some users get every device at once (a provisioning script): equal first sightings.
        start = _early(rng, ACTIVE_SPAN) if count > 1 and rng.random() < 0.5 else None
        # Some users' agents name the user at install and in their first heartbeat only.
        anonymous, kind_in_heartbeats = rng.random() < 0.3, rng.random() < 0.5
        for index in range(count):
            kind = "business" if index == 0 else rng.choices(_KINDS, weights=[1, 3])[0]
            device = _Device(customer, f"d{serial:06d}-{index}", user, kind, start=start)
            device.anonymous_heartbeats = anonymous
            device.kind_in_heartbeats = kind_in_heartbeats
            # With three or more devices, the first personal one (usually covered) may
            # flap: each flap moves the over-allowance license off another device and back.
            device.flapper = index == 1 and count >= 3 and rng.random() < 0.5
            fleet.append(device)
    for device in fleet:
        _choose_life(rng, device, users[device.customer_id])
    return fleet


_KINDS = ["business", "personal"]


def _choose_life(rng: random.Random, device: _Device, users: list[str]) -> None:
    roll = rng.random()
    if device.flapper:
        device.uninstall, device.reinstall = True, "heartbeat"
    elif roll < 0.03:
        device.stale = True
    elif roll < 0.08:
        device.installed = False
        device.silent_kind = rng.random() < 0.5
    elif roll < 0.28:
        device.uninstall = True
        device.reinstall = rng.choices([None, "install", "heartbeat"], weights=[3, 2, 5])[0]
    elif roll < 0.38:
        others = [user for user in users if user != device.user_id]
        if device.user_id is not None and (rng.random() < 0.1 or not others):
            device.move_to = ""  # the device becomes unassigned
        elif rng.random() < 0.4 or not others:
            device.move_to = f"moved-{device.device_id}@{device.customer_id}.example"
        else:
            device.move_to = rng.choice(others)
    # A device changing users names them in every heartbeat.
    device.anonymous_heartbeats = device.anonymous_heartbeats and device.move_to is None
    device.kind_change = not device.stale and rng.random() < 0.04
    device.future = not device.stale and rng.random() < 0.02


def _device_signals(
    rng: random.Random, ids: _Ids, device: _Device, per_device: int, base: datetime
) -> Iterator[AgentSignal]:
    span = STALE_SPAN if device.stale else ACTIVE_SPAN
    count = max(3, int(per_device * rng.uniform(0.6, 1.4)))
    start = _early(rng, span)
    if device.start is not None and not device.stale:
        start = device.start
    offsets = _unique_offsets(rng, start, span[1], count)
    life = _Life(device, ids, base)
    uninstall_at = len(offsets) // 2 if device.uninstall else None
    move_at = len(offsets) // 2 if device.move_to is not None else None
    kind_at = len(offsets) * 2 // 3 if device.kind_change else None
    for index, offset in enumerate(offsets):
        if index == move_at:
            life.user_id = device.move_to or None
        if index == kind_at:
            life.kind = "personal" if device.kind == "business" else "business"
        if index == 0 and device.installed:
            yield life.install(offset)
        elif uninstall_at is not None and index == uninstall_at:
            yield life.uninstall(offset)
            if device.reinstall == "heartbeat":
                following = offsets[index + 1 : index + 2]
                yield from _flaps(rng, life, offset, following, twice=device.flapper)
        elif uninstall_at is not None and index == uninstall_at + 1 and device.reinstall:
            yield life.install(offset) if device.reinstall == "install" else life.heartbeat(offset)
        elif uninstall_at is not None and index > uninstall_at and not device.reinstall:
            return
        else:
            says_kind = device.kind_in_heartbeats or index == kind_at or rng.random() < 0.2
            anonymous = device.anonymous_heartbeats and life.heartbeats > 0
            yield life.heartbeat(
                offset, report_kind=says_kind and not device.silent_kind, anonymous=anonymous
            )
    if device.future:
        yield life.heartbeat(rng.randint(*FUTURE_SPAN), future=True)


def _flaps(
    rng: random.Random, life: _Life, uninstalled_at: int, following: list[int], *, twice: bool
) -> Iterator[AgentSignal]:
    """An upgrade: the agent is back minutes after its uninstall (a heartbeat says so); one
    in two (every flapper) flaps once more, hours later, before its next regular signal."""
    until = following[0] if following else uninstalled_at + 8 * 3600
    back = uninstalled_at + rng.randint(30, 900)
    if back >= until:
        return
    yield life.heartbeat(back)
    again = back + rng.randint(3 * 3600, 6 * 3600)
    if (twice or rng.random() < 0.5) and again + 900 < until:
        yield life.uninstall(again)
        yield life.heartbeat(again + rng.randint(30, 900))


def _early(rng: random.Random, span: tuple[int, int]) -> int:
    """A start in the first third of the span."""
    return rng.randint(span[0], span[0] + (span[1] - span[0]) // 3)


def _unique_offsets(rng: random.Random, start: int, end: int, count: int) -> list[int]:
    step = max(2, (end - start) // count)
    offsets, at = [], start
    for _ in range(count):
        offsets.append(at)
        at += rng.randint(step // 2, step * 3 // 2) + 1
    return [offset for offset in offsets if offset < end] or [start]


class _Life:
    """A device's agent: what it reports as time goes by."""

    def __init__(self, device: _Device, ids: _Ids, base: datetime) -> None:
        self.device, self.ids, self.base = device, ids, base
        self.user_id = device.user_id
        self.kind = device.kind
        self.installs = 0
        self.heartbeats = 0

    def _signal(self, event_type: str, offset: int, **fields: Any) -> AgentSignal:
        return AgentSignal(
            event_id=self.ids.event_id(),
            type=event_type,
            customer_id=self.device.customer_id,
            device_id=self.device.device_id,
            occurred_at=self.base + timedelta(seconds=offset),
            **fields,
        )

    def _version(self, offset: int) -> str:
        return "5.3.1" if offset < -10 * DAY else "5.4.0"

    def install(self, offset: int) -> AgentSignal:
        self.installs += 1
        suffix = "" if self.installs == 1 else f"-r{self.installs}"
        user = self.user_id
        return self._signal(
            "install",
            offset,
            names_user=True,
            user_id=user,
            device_kind=self.kind,
            hostname=f"host-{self.device.device_id}{suffix}",
            os="windows" if self.kind == "business" else "android",
            agent_version=self._version(offset),
            email=user,
            display_name=None if user is None else f"User {user.split('@')[0]}",
        )

    def heartbeat(
        self,
        offset: int,
        *,
        report_kind: bool = False,
        future: bool = False,
        anonymous: bool = False,
    ) -> AgentSignal:
        self.heartbeats += 1
        return self._signal(
            "heartbeat",
            offset,
            names_user=not anonymous,
            user_id=self.user_id,
            device_kind=self.kind if report_kind else None,
            agent_version=self._version(offset),
            future=future,
        )

    def uninstall(self, offset: int) -> AgentSignal:
        return self._signal("uninstall", offset, names_user=False)


def _deliver(
    rng: random.Random, signals: list[AgentSignal], shape: StreamShape, devices: int
) -> list[Message]:
    """Delivery order: by event time (agents send as they go), except late events (held
    back past newer events of their device), duplicates (the same bytes again, later),
    future-clocked events (sent at a random moment) and the poison messages."""
    in_time = sorted(signals, key=lambda s: (s.future, s.occurred_at, s.device_id))
    on_time = _never_late(signals)
    keyed: list[tuple[float, Message]] = []
    for index, signal in enumerate(in_time):
        message = Message(signal.topic, signal.key, orjson.dumps(signal.body()), signal)
        position = float(index)
        if signal.future:
            position = rng.uniform(0, len(in_time))
        elif signal.event_id not in on_time and rng.random() < _late_chance(signal, shape):
            position = index + rng.randint(devices, 6 * devices) + 0.5
            message = Message(message.topic, message.key, message.value, signal, late=True)
        keyed.append((position, message))
        if rng.random() < shape.duplicate_share:
            again = Message(message.topic, message.key, message.value, signal, duplicate=True)
            keyed.append((position + rng.randint(1, 3 * devices) + 0.25, again))
    for poison in shape.poison:
        keyed.append((rng.uniform(0.15, 0.85) * len(in_time), _poison_message(rng, poison)))
    keyed.sort(key=lambda item: item[0])
    return [message for _, message in keyed]


def _late_chance(signal: AgentSignal, shape: StreamShape) -> float:
    # A late install moves its device's first sighting back, which can change which of a
    # user's devices is over the allowance: more of those.
    return 0.25 if signal.type == "install" else shape.late_share


def _never_late(signals: list[AgentSignal]) -> set[str]:
    """The first install and the first heartbeat of every device with a signal that names no
    user: each is the first on its partition to name the device's user, so the worker knows
    whom to credit when the nameless signals behind it arrive."""
    nameless = {(s.customer_id, s.device_id) for s in signals if not s.names_user}
    first: dict[tuple[str, str, str], AgentSignal] = {}
    for signal in signals:
        key = (signal.customer_id, signal.device_id, signal.type)
        if (key[0], key[1]) not in nameless or signal.type == "uninstall":
            continue
        if key not in first or signal.occurred_at < first[key].occurred_at:
            first[key] = signal
    return {signal.event_id for signal in first.values()}


def _poison_message(rng: random.Random, poison: Poison) -> Message:
    key = f"fc01:poison-{poison.value}".encode()
    if poison is Poison.INVALID_JSON:
        value = b'{"schema_version": 1, "event_id": "broken", "type": "heartbeat",'
        return Message(Topic.HEARTBEAT, key, value, poison=poison)
    if poison is Poison.SCHEMA_VIOLATION:
        body = {"schema_version": 1, "event_id": f"bad-{rng.getrandbits(32)}", "type": "install"}
        body |= {"customer_id": "fc01", "device_id": "", "occurred_at": "yesterday"}
        return Message(Topic.LIFECYCLE, key, orjson.dumps(body), poison=poison)
    padding = "x" * OVERSIZED_BYTES
    body = {"schema_version": 1, "event_id": "huge", "type": "heartbeat", "pad": padding}
    value = orjson.dumps(body)
    return Message(Topic.HEARTBEAT, key, value[: OVERSIZED_BYTES - 2] + b'"}', poison=poison)

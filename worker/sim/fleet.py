"""A simulated fleet of agents: realistic event streams for the demo, tests and benchmarks."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class SimulatedDevice:
    customer_id: str
    device_id: str
    user_id: str | None
    kind: str

    @property
    def key(self) -> bytes:
        return f"{self.customer_id}:{self.device_id}".encode()


def build_fleet(customers: int, devices_per_customer: int, seed: int = 0) -> list[SimulatedDevice]:
    """Each customer's devices are spread over users at three devices a user (one business,
    two personal), with every tenth device unassigned."""
    fleet = []
    for customer_number in range(customers):
        customer_id = simulated_customer_id(customer_number, seed)
        for device_number in range(devices_per_customer):
            unassigned = device_number % 10 == 9
            user_id = None if unassigned else f"user-{device_number // 3:05d}@{customer_id}.example"
            kind = "business" if device_number % 3 == 0 else "personal"
            fleet.append(SimulatedDevice(customer_id, f"dev-{device_number:06d}", user_id, kind))
    return fleet


def simulated_customer_id(number: int, seed: int = 0) -> str:
    return f"cust-{seed:02d}-{number:04d}"


def event_id(device: SimulatedDevice, event_type: str, at: datetime) -> str:
    """Deterministic, so a re-run of the same simulation re-sends the same events."""
    name = f"{device.customer_id}/{device.device_id}/{event_type}/{at.isoformat()}"
    return str(uuid.uuid5(uuid.NAMESPACE_URL, name))


def agent_event(device: SimulatedDevice, event_type: str, at: datetime) -> dict[str, Any]:
    event: dict[str, Any] = {
        "schema_version": 1,
        "event_id": event_id(device, event_type, at),
        "type": event_type,
        "customer_id": device.customer_id,
        "device_id": device.device_id,
        "user_id": device.user_id,
        "occurred_at": at.isoformat().replace("+00:00", "Z"),
        "agent_version": "5.3.1",
    }
    if event_type == "install":
        event["device_kind"] = device.kind
        event["hostname"] = f"host-{device.device_id}"
        event["os"] = "windows-11"
        if device.user_id is not None:
            event["user"] = {"email": device.user_id, "display_name": f"User {device.user_id}"}
    return event


def encode(event: dict[str, Any]) -> bytes:
    return orjson.dumps(event)


def heartbeat_rounds(
    fleet: list[SimulatedDevice], rounds: int, start: datetime, interval: timedelta
) -> Iterator[tuple[SimulatedDevice, datetime]]:
    """Every device heartbeats once per round: round-robin, as a live fleet looks on the wire."""
    for round_number in range(rounds):
        at = start + interval * round_number
        for device in fleet:
            yield device, at


def device_bursts(
    fleet: list[SimulatedDevice], per_device: int, start: datetime, interval: timedelta
) -> Iterator[tuple[SimulatedDevice, datetime]]:
    """Each device's heartbeats back to back: a backlog replay of a long outage."""
    for device in fleet:
        for number in range(per_device):
            yield device, start + interval * number


def console_events(customers: int, at: datetime, trial_days: int = 14) -> list[dict[str, Any]]:
    """What an MSP console sends for a simulated fleet's customers: each customer is created
    with a Core subscription; the first one also trials Core+ for its `admins` group, whose
    members are the first two users."""
    events = []
    for number in range(customers):
        customer_id = simulated_customer_id(number)
        events.append(_console(customer_id, "customer.created", at, name=f"Customer {number}"))
        events.append(
            _console(
                customer_id,
                "subscription.attached",
                at,
                subscription_id=f"{customer_id}-core",
                package="core",
                status="active",
            )
        )
        if number == 0:
            events.append(
                _console(
                    customer_id,
                    "subscription.attached",
                    at,
                    subscription_id=f"{customer_id}-admins-trial",
                    package="core_plus",
                    group_id="admins",
                    status="in_trial",
                    trial_ends_at=(at + timedelta(days=trial_days)).isoformat(),
                )
            )
            for user_number in range(2):
                user_id = f"user-{user_number:05d}@{customer_id}.example"
                events.append(
                    _console(
                        customer_id, "group.member_added", at, group_id="admins", user_id=user_id
                    )
                )
    return events


def _console(customer_id: str, event_type: str, at: datetime, **fields: Any) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "event_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{customer_id}/{event_type}/{fields}")),
        "type": event_type,
        "customer_id": customer_id,
        "occurred_at": at.isoformat().replace("+00:00", "Z"),
        **fields,
    }

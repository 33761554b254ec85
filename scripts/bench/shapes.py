"""The fleets the benchmark feeds the worker, pre-encoded: a live fleet (every device once per
round), a backlog replay (each device's heartbeats back to back), first sightings (one
heartbeat of each of many new devices) and the steady state (a fleet stored beforehand,
heartbeating round after round)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from scripts.bench.code_under_test import UnderTest

HEARTBEAT_INTERVAL = timedelta(minutes=5)
STEADY_CUSTOMERS = 100
STEADY_DEVICES = 200_000
STEADY_ROUNDS = 12


@dataclass(frozen=True)
class Shape:
    name: str
    customers: int
    devices_per_customer: int
    heartbeats_per_device: int
    # "rounds": every device once per round (a live fleet); "bursts": each device's
    # heartbeats back to back (a backlog replay after an outage).
    order: str
    uninstall_every: int = 100  # every Nth device sends an uninstall at the end; 0: none
    seed: int = 0
    # Whether each device sends an install first; with `stored_beforehand`, the installs are
    # drained before the measurement (not timed), so the timed messages meet a known fleet.
    installs: bool = True
    stored_beforehand: bool = False
    kind_in_heartbeats: bool = False  # heartbeats carry `device_kind` (agents that send it)

    @property
    def devices(self) -> int:
        return self.customers * self.devices_per_customer

    def describe(self) -> str:
        order = "round-robin rounds" if self.order == "rounds" else "per-device bursts"
        kind = " (kind given)" if self.kind_in_heartbeats else ""
        first = ""
        if self.installs:
            stored = " (stored beforehand, not timed)" if self.stored_beforehand else ""
            first = f"1 install{stored} + "
        uninstalls = (
            f", 1 uninstall per {self.uninstall_every} devices" if self.uninstall_every else ""
        )
        return (
            f"{self.devices:,} devices ({self.customers} customers), {first}"
            f"{self.heartbeats_per_device} heartbeat(s){kind} each ({order}, "
            f"{HEARTBEAT_INTERVAL.seconds // 60} min apart){uninstalls}"
        )


Messages = list[tuple[bytes, bytes]]  # (key, value), in the order they are produced


@dataclass
class Workload:
    shape: Shape
    lifecycle: Messages
    heartbeats: Messages
    devices: int
    lifecycle_events: int  # every lifecycle event stored at the end, stored beforehand or not
    # Produced and drained before the measurement (not timed): the fleet stored beforehand.
    stored_beforehand: Messages

    @property
    def total(self) -> int:
        """The timed messages."""
        return len(self.lifecycle) + len(self.heartbeats)


def build_workload(shape: Shape, now: datetime) -> Workload:
    """Pre-encodes every message, so producing is not limited by building events."""
    encode, agent_event = UnderTest.encode, UnderTest.agent_event
    fleet = UnderTest.build_fleet(shape.customers, shape.devices_per_customer, seed=shape.seed)
    start = now - HEARTBEAT_INTERVAL * (shape.heartbeats_per_device + 2)
    installed_at = start - timedelta(minutes=1)
    installs = (
        [(d.key, encode(agent_event(d, "install", installed_at))) for d in fleet]
        if shape.installs
        else []
    )

    def heartbeat(device: Any, at: datetime) -> bytes:
        event = agent_event(device, "heartbeat", at)
        if shape.kind_in_heartbeats:
            event["device_kind"] = device.kind
        return encode(event)

    generator = UnderTest.heartbeat_rounds if shape.order == "rounds" else UnderTest.device_bursts
    heartbeats = [
        (d.key, heartbeat(d, at))
        for d, at in generator(fleet, shape.heartbeats_per_device, start, HEARTBEAT_INTERVAL)
    ]
    uninstalled_at = start + HEARTBEAT_INTERVAL * shape.heartbeats_per_device
    uninstalls = (
        [
            (d.key, encode(agent_event(d, "uninstall", uninstalled_at)))
            for d in fleet[shape.uninstall_every - 1 :: shape.uninstall_every]
        ]
        if shape.uninstall_every
        else []
    )
    stored = installs if shape.stored_beforehand else []
    lifecycle = uninstalls if shape.stored_beforehand else installs + uninstalls
    return Workload(
        shape,
        lifecycle,
        heartbeats,
        len(fleet),
        len(installs) + len(uninstalls),
        stored,
    )


def steady_shape(devices: int, rounds: int, customers: int = STEADY_CUSTOMERS) -> Shape:
    """A known fleet of `devices` (over `customers`, at least one device each), stored
    beforehand, then `rounds` heartbeat rounds, round-robin: what production sees almost all
    the time. Nothing but last seen changes: no uninstalls."""
    customers = min(customers, devices)
    return Shape(
        "steady",
        customers,
        devices // customers,
        rounds,
        "rounds",
        uninstall_every=0,
        seed=4,
        stored_beforehand=True,
    )


def first_sighting_shape(devices: int, customers: int = STEADY_CUSTOMERS) -> Shape:
    """One heartbeat of each of `devices` new devices, kind given, no install: every event
    creates its device (and the user's license)."""
    return Shape(
        "first_sighting",
        customers,
        max(1, devices // customers),
        1,
        "rounds",
        uninstall_every=0,
        seed=3,
        installs=False,
        kind_in_heartbeats=True,
    )


def full_shapes(devices: int = STEADY_DEVICES, rounds: int = STEADY_ROUNDS) -> dict[str, Shape]:
    return {
        "live": Shape("live", 50, 1_000, 7, "rounds", seed=1),
        "backlog": Shape("backlog", 20, 1_000, 15, "bursts", seed=2),
        "first_sighting": first_sighting_shape(300_000),
        "steady": steady_shape(devices, rounds),
    }


def quick_shapes(devices: int = 5_000, rounds: int = 3) -> dict[str, Shape]:
    # Each shape's timed messages span several 5,000-message batches: the rates count the
    # messages after the first batch.
    return {
        "live": Shape("live", 4, 500, 3, "rounds", seed=1),
        "backlog": Shape("backlog", 2, 250, 12, "bursts", seed=2),
        "first_sighting": first_sighting_shape(12_000, customers=4),
        "steady": steady_shape(devices, rounds, customers=4),
    }

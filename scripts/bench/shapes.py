"""The fleets the benchmark feeds the worker: a live fleet (every device once per round) and a
backlog replay (each device's heartbeats back to back), pre-encoded."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from scripts.bench.code_under_test import UnderTest

HEARTBEAT_INTERVAL = timedelta(minutes=5)


@dataclass(frozen=True)
class Shape:
    name: str
    customers: int
    devices_per_customer: int
    heartbeats_per_device: int
    # "rounds": every device once per round (a live fleet); "bursts": each device's
    # heartbeats back to back (a backlog replay after an outage).
    order: str
    uninstall_every: int = 100  # every Nth device sends an uninstall at the end
    seed: int = 0

    @property
    def devices(self) -> int:
        return self.customers * self.devices_per_customer

    def describe(self) -> str:
        order = "round-robin rounds" if self.order == "rounds" else "per-device bursts"
        return (
            f"{self.devices:,} devices ({self.customers} customers), 1 install + "
            f"{self.heartbeats_per_device} heartbeats each ({order}), "
            f"1 uninstall per {self.uninstall_every} devices"
        )


@dataclass
class Workload:
    shape: Shape
    lifecycle: list[tuple[bytes, bytes]]
    heartbeats: list[tuple[bytes, bytes]]
    devices: int
    lifecycle_events: int

    @property
    def total(self) -> int:
        return len(self.lifecycle) + len(self.heartbeats)


def build_workload(shape: Shape, now: datetime) -> Workload:
    """Pre-encodes every message, so producing is not limited by building events."""
    encode, agent_event = UnderTest.encode, UnderTest.agent_event
    fleet = UnderTest.build_fleet(shape.customers, shape.devices_per_customer, seed=shape.seed)
    start = now - HEARTBEAT_INTERVAL * (shape.heartbeats_per_device + 2)
    installed_at = start - timedelta(minutes=1)
    lifecycle = [(d.key, encode(agent_event(d, "install", installed_at))) for d in fleet]
    generator = UnderTest.heartbeat_rounds if shape.order == "rounds" else UnderTest.device_bursts
    heartbeats = [
        (d.key, encode(agent_event(d, "heartbeat", at)))
        for d, at in generator(fleet, shape.heartbeats_per_device, start, HEARTBEAT_INTERVAL)
    ]
    uninstalled_at = start + HEARTBEAT_INTERVAL * shape.heartbeats_per_device
    lifecycle += [
        (d.key, encode(agent_event(d, "uninstall", uninstalled_at)))
        for d in fleet[shape.uninstall_every - 1 :: shape.uninstall_every]
    ]
    return Workload(shape, lifecycle, heartbeats, len(fleet), len(lifecycle))


def full_shapes() -> dict[str, Shape]:
    return {
        "live": Shape("live", 50, 1_000, 7, "rounds", seed=1),
        "backlog": Shape("backlog", 20, 1_000, 15, "bursts", seed=2),
    }


def quick_shapes() -> dict[str, Shape]:
    return {
        "live": Shape("live", 4, 500, 3, "rounds", seed=1),
        "backlog": Shape("backlog", 2, 250, 12, "bursts", seed=2),
    }

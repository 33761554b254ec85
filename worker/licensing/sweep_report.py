"""What one sweeper pass did, as the parts of the pass fill it in and the log shows it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass
class SweepReport:
    now: datetime
    dry_run: bool
    ran: bool = True
    decision_time: datetime | None = None
    waited_for_lag: bool = False
    scanned_from: datetime | None = None
    scanned_until: datetime | None = None
    released: int = 0
    basis_changed: int = 0
    purged: int = 0
    # Devices without a user whose host name the purge removed.
    purged_devices: int = 0
    trials_activated: int = 0
    seat_crossings: int = 0
    usage_snapshots: int = 0
    held_customers: list[str] = field(default_factory=list)
    applied_holds: list[str] = field(default_factory=list)

    def as_log(self) -> dict[str, object]:
        return {name: loggable(value) for name, value in self.__dict__.items()}


class SweepInterrupted(Exception):
    """The worker is stopping; the run ends between pages without saving its progress."""


def loggable(value: object) -> object:
    return value.isoformat() if isinstance(value, datetime) else value

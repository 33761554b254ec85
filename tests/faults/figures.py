"""The figures of a fault-suite run, and how they are printed."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Figures:
    messages_produced: int = 0
    distinct_events: int = 0
    duplicates: int = 0
    late: int = 0
    poison: int = 0
    replicas: int = 0
    sigkills: int = 0
    postgres_restarts: int = 0
    broker_restarts: int = 0
    unexpected_exits: int = 0
    lost: int = 0
    doubled: int = 0
    mismatches: int = 0
    deadlocks: int | None = None
    deadlock_errors_logged: int = 0
    recoveries: list[tuple[str, float | None]] = field(default_factory=list)
    drain_seconds: float | None = None
    license_events: str = ""
    dead_letters: str = ""
    seconds: float = 0.0

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("messages produced", f"{self.messages_produced:,}"),
            ("distinct valid events", f"{self.distinct_events:,}"),
            ("duplicates (same event_id re-sent)", f"{self.duplicates:,}"),
            ("late / out of order", f"{self.late:,}"),
            ("poison messages", str(self.poison)),
            ("replicas", str(self.replicas)),
            ("SIGKILLs of replicas", str(self.sigkills)),
            ("Postgres restarts", str(self.postgres_restarts)),
            ("broker restarts", str(self.broker_restarts)),
            ("replicas that died on their own", str(self.unexpected_exits)),
            ("lost", str(self.lost)),
            ("doubled", str(self.doubled)),
            ("mismatches", str(self.mismatches)),
            ("deadlocks (pg_stat_database)", _optional(self.deadlocks)),
            ("deadlock errors in worker logs", str(self.deadlock_errors_logged)),
            ("recovery after restart (s)", self._recoveries()),
            ("drain after last message (s)", _seconds(self.drain_seconds)),
            ("license events (records / distinct ids)", self.license_events),
            ("dead letters (records / sources)", self.dead_letters),
            ("run time (s)", f"{self.seconds:.0f}"),
        ]

    def _recoveries(self) -> str:
        if not self.recoveries:
            return "-"
        return ", ".join(f"{fault} {_seconds(seconds)}" for fault, seconds in self.recoveries)

    def table(self) -> str:
        rows = self.rows()
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _optional(value: int | None) -> str:
    return "unknown" if value is None else str(value)


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f}"

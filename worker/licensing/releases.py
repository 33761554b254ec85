"""Releases the licenses of devices silent past the window, page by page, except for the
customers the outage guard holds: a mass release is held until an operator confirms it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime

import structlog

from worker.db.repository import Repository
from worker.licensing.decisions import (
    Group,
    count_license_changes,
    decide_groups,
    groups_of_devices,
)
from worker.licensing.sweep_report import SweepInterrupted, SweepReport
from worker.licensing.sweep_rules import CustomerRisk, customers_to_hold
from worker.ops import metrics
from worker.settings import Settings

log = structlog.get_logger(__name__)
BEGINNING = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class SilentDevice:
    last_seen_day: date
    customer_id: str
    device_id: str
    user_id: str | None


# Sorts before every stored device: the cursor of the first page.
BEFORE_EVERY_DEVICE = SilentDevice(BEGINNING.date(), "", "", None)


@dataclass(frozen=True, slots=True)
class SilentDeviceQuery:
    """A keyset-paged query of silent devices. It takes `filters`, then the cursor (the last
    device's `last_seen_day`, then its `keys`, in the query's order), then the page size."""

    name: str
    filters: tuple[str | datetime, ...]
    keys: Callable[[SilentDevice], tuple[str, ...]]


def silent_devices(start: datetime, end: datetime) -> SilentDeviceQuery:
    """Every customer's protected devices that fell silent in [start, end)."""
    return SilentDeviceQuery(
        "silent_devices_page", (start, end), lambda device: (device.customer_id, device.device_id)
    )


def silent_devices_of(customer_id: str, start: datetime, end: datetime) -> SilentDeviceQuery:
    """One customer's protected devices that fell silent in [start, end)."""
    return SilentDeviceQuery(
        "silent_devices_of_customer", (customer_id, start, end), lambda device: (device.device_id,)
    )


async def silent_device_pages(
    repository: Repository, query: SilentDeviceQuery, page_size: int
) -> AsyncIterator[list[SilentDevice]]:
    """Keyset pages of the devices `query` finds: bounded memory however many there are."""
    cursor = BEFORE_EVERY_DEVICE
    while True:
        rows = await repository.fetch(
            query.name, *query.filters, cursor.last_seen_day, *query.keys(cursor), page_size
        )
        if not rows:
            return
        page = [
            SilentDevice(row["last_seen_day"], row["customer_id"], row["device_id"], row["user_id"])
            for row in rows
        ]
        yield page
        cursor = page[-1]


class Releases:
    def __init__(
        self,
        settings: Settings,
        repository: Repository,
        *,
        stopping: asyncio.Event,
        beat: Callable[[], None],
    ) -> None:
        self._settings = settings
        self._repository = repository
        self._stopping = stopping
        self._beat = beat

    async def unconfirmed_holds(self) -> set[str]:
        if self._settings.guard_override:
            return set()
        holds = await self._repository.fetch("open_holds")
        return {hold["customer_id"] for hold in holds if hold["confirmed_at"] is None}

    async def hold_suspicious(
        self, scanned_from: datetime, boundary: datetime, held: set[str], dry_run: bool
    ) -> set[str]:
        """Customers newly held by the outage guard for [scanned_from, boundary). Customers
        already held get this range added to their hold."""
        rows = await self._repository.fetch("licenses_at_risk", scanned_from, boundary)
        risks = [CustomerRisk(r["customer_id"], r["at_risk"], r["active"]) for r in rows]
        newly_held = set()
        if not self._settings.guard_override:
            for risk in customers_to_hold(
                risks, self._settings.guard_max_release_share, self._settings.guard_min_releases
            ):
                newly_held.add(risk.customer_id)
                log.warning(
                    "sweep.held_by_outage_guard",
                    customer_id=risk.customer_id,
                    at_risk=risk.at_risk,
                    active=risk.active,
                )
        metrics.SWEEP_HELD.inc(len(newly_held))
        if not dry_run:
            await self._repository.execute("extend_unconfirmed_holds", boundary)
            for risk in risks:
                if risk.customer_id in newly_held - held:
                    await self._repository.execute(
                        "hold_customer",
                        risk.customer_id,
                        scanned_from,
                        boundary,
                        risk.at_risk,
                        risk.active,
                    )
        return newly_held

    async def release_silent(
        self,
        query: SilentDeviceQuery,
        held: set[str],
        decision_time: datetime,
        report: SweepReport,
        dry_run: bool,
    ) -> None:
        """Decides the devices `query` finds, except those of the `held` customers."""
        pages = silent_device_pages(self._repository, query, self._settings.sweep_page_size)
        async for page in pages:
            self._beat()
            if self._stopping.is_set():
                # Stop between pages; the next run decides the rest (every page is idempotent).
                raise SweepInterrupted
            groups = {
                group
                for group in groups_of_devices(
                    (device.customer_id, device.device_id, device.user_id, None) for device in page
                )
                if group.customer_id not in held
            }
            await self._decide(groups, decision_time, report, dry_run)

    async def _decide(
        self, groups: Iterable[Group], decision_time: datetime, report: SweepReport, dry_run: bool
    ) -> None:
        async with self._repository.transaction(rollback=dry_run) as session:
            rows = await decide_groups(
                session,
                groups,
                decision_time,
                report.now,
                self._settings.release_window,
                settle=self._settings.allocation_settle,
                event_key=self._settings.event_id_key(),
            )
        report.released += sum(row.change == "released" for row in rows)
        report.basis_changed += sum(row.change == "basis_changed" for row in rows)
        if not dry_run:
            count_license_changes(rows)

    async def apply_confirmed_holds(
        self, decision_time: datetime, report: SweepReport, dry_run: bool
    ) -> None:
        for hold in await self._repository.fetch("open_holds"):
            if hold["confirmed_at"] is None and not self._settings.guard_override:
                continue
            query = silent_devices_of(
                hold["customer_id"], hold["from_boundary"], hold["to_boundary"]
            )
            await self.release_silent(query, set(), decision_time, report, dry_run)
            if not dry_run:
                await self._repository.execute(
                    "mark_hold_applied", hold["id"], report.now, hold["customer_id"]
                )
            report.applied_holds.append(hold["customer_id"])

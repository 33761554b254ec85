"""The license sweeper: one pass every interval, by one replica at a time (the leader lease,
worker/db/leases.py: every transaction of a pass checks it).
A pass releases licenses silent past the window and holds suspicious mass releases
(`releases.py`), purges personal data past the retention (`purges.py`), ends trials
(`trials.py`), tells billing about subscriptions over their seats (`seats.py`) and
takes the daily usage snapshots (`usage_snapshots.py`), then keeps the monthly partitions
of the history, lifecycle events and snapshots (`partitions.py`).

It only reads the clock, calls the pure rules, writes and sleeps: the decisions are
`worker/licensing/rules.py` and `worker/licensing/sweep_rules.py`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta

import structlog

from worker.clock import Clock
from worker.db.errors import is_transient_database_error
from worker.db.leases import Leadership, Lease, LeaseLost, lease_holder
from worker.db.repository import Repository
from worker.db.wait import wait_to_retry
from worker.licensing.partitions import maintain_partitions_logged
from worker.licensing.purges import Purges
from worker.licensing.releases import BEGINNING, Releases, silent_devices
from worker.licensing.seats import check_seats
from worker.licensing.sweep_report import SweepInterrupted, SweepReport, loggable
from worker.licensing.sweep_rules import PartitionKey, StoredProgress, ingestion_watermark
from worker.licensing.trials import end_trials
from worker.licensing.usage_snapshots import take_usage_snapshots
from worker.ops import metrics
from worker.ops.logs import error_fields
from worker.retry import Backoff
from worker.settings import Settings

log = structlog.get_logger(__name__)
LAG_REPORT_THRESHOLD = timedelta(seconds=60)
LICENSE_KINDS = [
    ("user", "user"),
    ("device", "unassigned"),
    ("device", "over_allowance"),
    ("device", "device_model"),
]
EndOffsets = Callable[[], Awaitable[Mapping[PartitionKey, int]]]


class Sweeper:
    def __init__(
        self,
        settings: Settings,
        repository: Repository,
        end_offsets: EndOffsets,
        clock: Clock,
        *,
        stopping: asyncio.Event | None = None,
        beat: Callable[[], None] = lambda: None,
    ) -> None:
        self._beat = beat
        self._settings = settings
        self._repository = repository
        self._end_offsets = end_offsets
        self._clock = clock
        self._stopping = stopping or asyncio.Event()
        self._holder = lease_holder(settings.replica_id)
        self._work_on(repository)

    def _work_on(self, repository: Repository) -> None:
        """The repository a pass writes through: the leader's, fenced by its lease."""
        self._work = repository
        self._releases = Releases(
            self._settings, repository, stopping=self._stopping, beat=self._beat
        )
        self._purges = Purges(self._settings, repository, self._clock)

    def _leadership(self) -> Leadership:
        return Leadership(
            self._repository, "sweeper", self._holder, self._settings.leader_lease_seconds
        )

    async def run_forever(self) -> None:
        """Competes for the sweeper lease; the replica that holds it sweeps every interval
        until it stops or loses the lease, then another one takes over. When Postgres is
        away, it waits until it answers and competes again at once."""
        backoff = Backoff(self._settings.retry_initial_seconds, self._settings.retry_max_seconds)
        while not self._stopping.is_set():
            try:
                another_replica_sweeps = not await self._lead_while_held()
                backoff.reset()
            except Exception as error:
                if not is_transient_database_error(error):
                    raise
                log.warning("sweep.database_unavailable", **error_fields(error))
                another_replica_sweeps = False
            if another_replica_sweeps:
                await self._sleep(self._settings.sweep_interval_seconds)
            elif not self._stopping.is_set():
                # The lease could not be asked for: Postgres did not answer.
                await wait_to_retry(
                    self._repository.answers,
                    backoff,
                    self._stopping,
                    task="sweeper",
                    beat=self._beat,
                )

    async def _lead_while_held(self) -> bool:
        """Sweeps every interval while this replica holds the lease; False if another does,
        or took it over (then this replica competes again after an interval)."""
        async with self._leadership() as leadership:
            lease = await leadership.acquire()
            if lease is None:
                return False
            log.info("sweep.leader_elected", lease_token=lease.token)
            self._work_on(self._repository.fenced(lease))
            try:
                await self._publish_totals()  # true from the election, not after a pass
                while lease.held and not self._stopping.is_set():
                    await self._run_logged()
                    await self._sleep(self._settings.sweep_interval_seconds, lease)
            finally:
                _withdraw_leader_gauges()
            return self._stopping.is_set()

    async def _run_logged(self) -> None:
        try:
            await self._run(dry_run=False)
        except SweepInterrupted:
            log.info("sweep.interrupted_for_shutdown")
        except LeaseLost:
            pass  # logged as lease.lost; another replica sweeps now
        except Exception as error:
            # A failed run is retried at the next interval; its work is idempotent.
            metrics.SWEEP_FAILURES.inc()
            log.error("sweep.failed", **error_fields(error))

    async def _sleep(self, seconds: float, lease: Lease | None = None) -> None:
        """Until `seconds` passed, the worker stops, or `lease` is lost."""
        self._beat()
        events = [self._stopping] if lease is None else [self._stopping, lease.lost]
        waits = [asyncio.ensure_future(event.wait()) for event in events]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def run_once(self, *, dry_run: bool = False) -> SweepReport:
        """One pass, if no other replica is sweeping (`ran` is False otherwise)."""
        async with self._leadership() as leadership:
            lease = await leadership.acquire()
            if lease is None:
                log.info("sweep.skipped_another_replica_sweeping")
                return SweepReport(now=self._clock.now(), dry_run=dry_run, ran=False)
            self._work_on(self._repository.fenced(lease))
            return await self._run(dry_run=dry_run)

    async def _run(self, *, dry_run: bool) -> SweepReport:
        now = self._clock.now()
        report = SweepReport(now=now, dry_run=dry_run)
        started = asyncio.get_running_loop().time()
        await self._sweep(report, dry_run)
        # Independent of ingestion lag: trials end by the clock, and billing gets a snapshot
        # every day even while ingestion is behind.
        event_key = self._settings.event_id_key()
        await end_trials(self._work, report, dry_run, event_key)
        await check_seats(self._work, report, dry_run, event_key)
        if self._settings.usage_snapshots_enabled:
            await take_usage_snapshots(self._work, report, dry_run, event_key)
        if not dry_run:
            await maintain_partitions_logged(self._work, self._settings, now)
        duration = asyncio.get_running_loop().time() - started
        if not dry_run:
            metrics.SWEEP_LAST_SUCCESS.set(time.time())
            metrics.SWEEP_DURATION.observe(duration)
            await self._publish_totals()
        log.info("sweep.finished", duration_seconds=round(duration, 3), **report.as_log())
        return report

    async def _sweep(self, report: SweepReport, dry_run: bool) -> None:
        decision_time = await self._decision_time(report)
        if decision_time is None:
            return
        report.decision_time = decision_time
        boundary = decision_time - self._settings.release_window
        state = await self._repository.fetch("sweep_state")
        scanned_from = state[0]["scanned_until"] if state else BEGINNING
        report.scanned_from, report.scanned_until = scanned_from, max(boundary, scanned_from)
        held = await self._releases.unconfirmed_holds()
        if boundary > scanned_from:
            held |= await self._releases.hold_suspicious(scanned_from, boundary, held, dry_run)
            silent = silent_devices(scanned_from, boundary)
            await self._releases.release_silent(silent, held, decision_time, report, dry_run)
        report.held_customers = sorted(held)
        await self._releases.apply_confirmed_holds(decision_time, report, dry_run)
        await self._purges.purge(decision_time, report, dry_run)
        if not dry_run:
            await self._work.execute("save_sweep_state", report.scanned_until, report.now)

    async def _decision_time(self, report: SweepReport) -> datetime | None:
        """`now`, or less while ingestion is behind: our own lag must not look like silence."""
        end_offsets = await self._end_offsets()
        rows = await self._repository.fetch("ingestion_progress", list(self._settings.agent_topics))
        progress = {
            (row["topic"], row["partition"]): StoredProgress(
                row["next_offset"], row["last_message_at"]
            )
            for row in rows
        }
        watermark = ingestion_watermark(end_offsets, progress, report.now)
        lag = report.now - watermark if watermark else None
        if lag is None:
            metrics.SWEEP_INGESTION_LAG.withdraw()  # not known: absent, not NaN
        else:
            metrics.SWEEP_INGESTION_LAG.set(lag.total_seconds())
        if watermark is None or lag is None or lag > LAG_REPORT_THRESHOLD:
            report.waited_for_lag = True
            metrics.SWEEP_LAG_WAITS.inc()
        if watermark is None:
            # Nothing stored yet for a partition with messages (every fresh start): no lag
            # to tell, and nothing is released until there is.
            log.debug("sweep.waiting_for_ingestion", reason="nothing stored yet")
        elif lag is not None and lag > LAG_REPORT_THRESHOLD:
            log.warning(
                "sweep.waiting_for_ingestion",
                lag_seconds=lag.total_seconds(),
                decision_time=loggable(watermark),
            )
        return watermark

    async def _publish_totals(self) -> None:
        counts = {
            (row["subject_type"], row["basis"]): row["licenses"]
            for row in await self._repository.fetch("license_totals")
        }
        metrics.LICENSES_ACTIVE.set_all(
            ((subject_type, basis), counts.get((subject_type, basis), 0))
            for subject_type, basis in LICENSE_KINDS
        )
        [row] = await self._repository.fetch("customers_with_licenses")
        metrics.CUSTOMERS_LICENSED.set(row["customers"])


def _withdraw_leader_gauges() -> None:
    """This replica no longer sweeps: what it measured is not kept as if still true."""
    for gauge in (metrics.LICENSES_ACTIVE, metrics.CUSTOMERS_LICENSED, metrics.SWEEP_INGESTION_LAG):
        gauge.withdraw()

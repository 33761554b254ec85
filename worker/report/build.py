"""The usage report (`license-worker report usage`): reads one database snapshot and hands
the report, customer by customer and row by row, to a writer of `worker/report/formats.py`
(or `worker/report/xlsx.py`).

Live, the totals come from the active license rows and the detail from every user and
device. As of a past time, both are replayed from the license history decided by then; a
time before the kept history (LICENSE_HISTORY_RETENTION_MONTHS) is refused, not answered
with counts that miss what was dropped.
Detail rows come through a server-side cursor, so memory does not grow with the fleet.
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

from worker.db.repository import Repository
from worker.db.session import Session
from worker.failures import OperatorError
from worker.licensing.seats import seat_usage
from worker.licensing.subscription_rules import SeatUsage
from worker.licensing.usage import LicenseCount, UsageTotals, usage_totals
from worker.report.formats import (
    CsvWriter,
    CustomerUsage,
    JsonWriter,
    ReportInfo,
    ReportWriter,
    TableWriter,
)
from worker.report.rows import Customer, ReportRow, history_row, live_row
from worker.report.xlsx import XlsxWriter

FORMATS = ("table", "json", "csv", "xlsx")


class UnknownCustomerError(LookupError):
    def __init__(self, customer_id: str) -> None:
        super().__init__(f"no customer {customer_id!r} in the database")


class HistoryNotRetainedError(OperatorError):
    """An as-of time before the kept license history: the changes decided before it were
    dropped (migration 0015), so the counts then cannot be replayed. Exit status 1."""

    def __init__(self, as_of: datetime, retained_from: datetime) -> None:
        super().__init__(
            f"{as_of.astimezone(UTC).isoformat()} is before the kept license history, which "
            f"begins at {retained_from.astimezone(UTC).isoformat()} "
            "(LICENSE_HISTORY_RETENTION_MONTHS): licenses then cannot be counted; ask for a "
            "time at or after it"
        )


async def refuse_before_kept_history(session: Session, as_of: datetime | None) -> None:
    """Raises HistoryNotRetainedError when `as_of` is before the kept history (from the
    time the oldest dropped month ended, in the baseline the report reads with it)."""
    if as_of is None:
        return
    rows = await session.fetch("history_retained_from")
    if rows and as_of < rows[0]["retained_from"]:
        raise HistoryNotRetainedError(as_of, rows[0]["retained_from"])


@dataclass(frozen=True, slots=True)
class ReportRequest:
    customer_id: str | None  # None: every customer
    as_of: datetime | None  # None: live
    now: datetime
    window: timedelta

    @property
    def time(self) -> datetime:
        return self.as_of or self.now


async def write_usage_report(
    repository: Repository, writer: ReportWriter, request: ReportRequest
) -> None:
    async with repository.snapshot() as session:
        await refuse_before_kept_history(session, request.as_of)
        customers = await _customers(session, request)
        counts = await _counts(session, request)
        by_customer: dict[str, list[LicenseCount]] = defaultdict(list)
        for customer_id, count in counts:
            by_customer[customer_id].append(count)
        seats = await _seats(session, request)
        usages = [
            CustomerUsage(
                customer,
                usage_totals(by_customer.get(customer.customer_id, [])),
                tuple(seats.get(customer.customer_id, ())),
            )
            for customer in customers
        ]
        info = ReportInfo(
            as_of=request.time,
            source="live" if request.as_of is None else "history",
            generated_at=request.now,
            release_window_days=request.window.days,
        )
        writer.start(info, usages, usage_totals(count for _, count in counts))
        await _write_rows(writer, usages, _rows(session, request))
        writer.finish()


async def _customers(session: Session, request: ReportRequest) -> list[Customer]:
    rows = await session.fetch("report_customers", request.customer_id, request.as_of)
    if request.customer_id is not None and not rows:
        raise UnknownCustomerError(request.customer_id)
    live = request.as_of is None
    return [
        Customer(
            customer_id=row["customer_id"],
            name=row["name"],
            status=row["status"] if live else None,
            license_model=row["license_model"] if live else None,
        )
        for row in rows
    ]


async def _seats(session: Session, request: ReportRequest) -> dict[str, list[SeatUsage]]:
    """Live only: how many seats each subscription uses is not replayed from history."""
    if request.as_of is not None:
        return {}
    by_customer: dict[str, list[SeatUsage]] = defaultdict(list)
    for usage in await seat_usage(session, request.customer_id):
        by_customer[usage.customer_id].append(usage)
    return by_customer


async def _counts(session: Session, request: ReportRequest) -> list[tuple[str, LicenseCount]]:
    """(customer, licenses of one kind), from the license rows or the history: never from
    the detail rows, which the totals are checked against."""
    if request.as_of is None:
        rows = await session.fetch("report_live_counts", request.customer_id)
    else:
        rows = await session.fetch("report_history_counts", request.customer_id, request.as_of)
    return [
        (
            row["customer_id"],
            LicenseCount(row["subject_type"], row["basis"], row["package"], row["licenses"]),
        )
        for row in rows
    ]


async def totals_as_of(
    session: Session, customer_id: str | None, as_of: datetime | None
) -> dict[str, UsageTotals]:
    """Each customer's totals as `report usage --as-of` counts them (`as_of` None: as the
    live report does), on the caller's snapshot (`reconcile --from/--to`); a customer
    without licenses then is left out. An unknown `customer_id` raises
    UnknownCustomerError."""
    now = as_of or datetime.now(UTC)
    request = ReportRequest(customer_id, as_of, now=now, window=timedelta(0))
    await refuse_before_kept_history(session, as_of)
    if customer_id is not None:
        await _customers(session, request)
    by_customer: dict[str, list[LicenseCount]] = defaultdict(list)
    for customer, count in await _counts(session, request):
        by_customer[customer].append(count)
    return {customer: usage_totals(counts) for customer, counts in by_customer.items()}


async def _rows(session: Session, request: ReportRequest) -> AsyncIterator[ReportRow]:
    if request.as_of is None:
        window_start = request.now - request.window
        async for record in session.stream("report_live_rows", request.customer_id, window_start):
            yield live_row(record, request.now, request.window)
    else:
        async for record in session.stream(
            "report_history_rows", request.customer_id, request.as_of
        ):
            yield history_row(record, request.as_of, request.window)


async def _write_rows(
    writer: ReportWriter, usages: Sequence[CustomerUsage], rows: AsyncIterator[ReportRow]
) -> None:
    """Both come ordered by customer id (byte order): each customer's rows follow it."""
    pending = await anext(rows, None)
    for usage in usages:
        writer.start_customer(usage)
        while pending is not None and pending.customer_id == usage.customer.customer_id:
            writer.row(pending)
            pending = await anext(rows, None)
        writer.end_customer()
    if pending is not None:
        raise RuntimeError(f"report row of customer {pending.customer_id!r} out of order")


@contextlib.contextmanager
def open_writer(output_format: str, output: Path | None, stdout: TextIO) -> Iterator[ReportWriter]:
    """The writer for a format, on `output` or `stdout`. A file appears only once the
    report is complete: it is written next to it and renamed at the end."""
    if output is None:
        if output_format == "xlsx":
            raise ValueError("an xlsx report needs an output file")
        yield _text_writer(output_format, stdout)
        return
    partial = output.with_name(f".{output.name}.partial")
    try:
        if output_format == "xlsx":
            # Fails now if the file cannot be created: openpyxl's save, at the end, leaves
            # its sheets' streams to fail again when they are collected.
            partial.touch()
            writer: ReportWriter = XlsxWriter(partial)
            try:
                yield writer
            except BaseException:
                writer.abort()
                raise
        else:
            with partial.open("w", encoding="utf-8", newline="") as out:
                yield _text_writer(output_format, out)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)


def _text_writer(output_format: str, out: TextIO) -> ReportWriter:
    writers: dict[str, type[JsonWriter | CsvWriter | TableWriter]] = {
        "json": JsonWriter,
        "csv": CsvWriter,
        "table": TableWriter,
    }
    return writers[output_format](out)

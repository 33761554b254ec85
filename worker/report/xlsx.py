"""The usage report as an Excel workbook, streamed: a writer of `worker/report/formats.py`'s
`ReportWriter` protocol.

No cell is ever a formula: openpyxl stores a text that starts with `=` as one (and `#REF!`
as an error), so every text cell is written as an explicit string cell, its control and
invisible characters as escapes (which also keeps out the characters XML refuses); a text
that starts like a formula also gets Excel's quote prefix, so it stays text when edited.
Numbers, booleans and times keep their types."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from openpyxl import Workbook
from openpyxl.cell import Cell, WriteOnlyCell
from openpyxl.styles import Font
from openpyxl.utils import get_column_letter
from openpyxl.worksheet._write_only import WriteOnlyWorksheet

from worker.licensing.usage import DEVICE_BASES, NO_PACKAGE, PackageTotals, UsageTotals
from worker.report.formats import CustomerUsage, ReportInfo, seats_text
from worker.report.rows import Customer, ReportRow
from worker.report.safe_text import looks_like_formula, printable

PACKAGES = ("core", "core_plus", NO_PACKAGE)
EXCEL_MAX_ROWS = 1_048_576
EXCEL_DATETIME = "yyyy-mm-dd hh:mm:ss"

# Excel has no time zones: times are written as UTC without a zone, and the headings say so.
DETAIL_SHEET = (
    ("customer", 18),
    ("subject type", 12),
    ("subject id", 34),
    ("user id", 30),
    ("device kind", 12),
    ("licensed", 10),
    ("status", 28),
    ("basis", 16),
    ("package", 11),
    ("last seen (UTC)", 20),
    ("devices covered", 16),
    ("last seen exact", 16),
)
SUMMARY_SHEET = (
    ("customer", 18),
    ("name", 24),
    ("status", 10),
    ("license model", 14),
    ("as of (UTC)", 20),
    ("source", 9),
    ("licensed users", 15),
    ("unassigned", 12),
    ("over allowance", 15),
    ("device model", 13),
    ("device licenses", 16),
    ("total licenses", 15),
    *(
        (f"{package} {what}", 14 + len(package))
        for package in PACKAGES
        for what in ("users", "device licenses", "total")
    ),
    ("seats (live)", 40),
)


class XlsxWriter:
    """A workbook with a Summary sheet (one row per customer, and a total row when there
    are several) and a Detail sheet (every row), streamed through openpyxl's write-only
    mode. A detail longer than Excel's row limit continues on `Detail 2`, `Detail 3`, ..."""

    def __init__(self, path: Path, max_rows: int = EXCEL_MAX_ROWS) -> None:
        self._path = path
        self._max_rows = max_rows
        self._book = Workbook(write_only=True)
        self._summary = self._sheet("Summary", SUMMARY_SHEET)
        self._detail_sheets = 0
        self._detail = self._new_detail_sheet()
        self._detail_rows = 1

    def start(
        self, info: ReportInfo, customers: Sequence[CustomerUsage], totals: UsageTotals
    ) -> None:
        summary = self._summary
        as_of = _excel_time(info.as_of, summary)
        for usage in customers:
            seats = "; ".join(seats_text(seats) for seats in usage.seats) or None
            cells = [*_customer_cells(usage.customer), as_of, info.source, *_totals(usage), seats]
            summary.append(_typed(summary, cells))
        if len(customers) > 1:
            label = f"all {len(customers)} customers"
            cells = [label, None, None, None, as_of, info.source, *_totals_cells(totals)]
            summary.append(_typed(summary, cells))

    def start_customer(self, usage: CustomerUsage) -> None:
        pass

    def row(self, row: ReportRow) -> None:
        if self._detail_rows >= self._max_rows:
            self._detail = self._new_detail_sheet()
            self._detail_rows = 1
        cells = [
            row.customer_id,
            row.subject_type,
            row.subject_id,
            row.user_id,
            row.device_kind,
            row.licensed,
            row.status,
            row.basis,
            row.package,
            _excel_time(row.last_seen_at, self._detail),
            row.devices_covered,
            row.last_seen_exact,
        ]
        self._detail.append(_typed(self._detail, cells))
        self._detail_rows += 1

    def end_customer(self) -> None:
        pass

    def finish(self) -> None:
        self._book.save(self._path)

    def abort(self) -> None:
        """Saving is openpyxl's only way to close the sheets' temporary files; the caller
        deletes the incomplete file. A failure here is not the error to tell: the one that
        made the report stop is (a directory that does not exist, a full disk)."""
        with contextlib.suppress(Exception):
            self._book.save(self._path)

    def _new_detail_sheet(self) -> WriteOnlyWorksheet:
        self._detail_sheets += 1
        title = "Detail" if self._detail_sheets == 1 else f"Detail {self._detail_sheets}"
        return self._sheet(title, DETAIL_SHEET)

    def _sheet(self, title: str, columns: Sequence[tuple[str, int]]) -> WriteOnlyWorksheet:
        """Widths and the frozen heading row must be set before the first row is written."""
        sheet: WriteOnlyWorksheet = self._book.create_sheet(title)
        # Set up by the worksheet's _setup(), missing from the type stubs.
        dimensions: Any = sheet.column_dimensions  # type: ignore[attr-defined]
        for number, (_, width) in enumerate(columns, start=1):
            dimensions[get_column_letter(number)].width = width
        sheet.freeze_panes = "A2"
        bold = Font(bold=True)
        headings = []
        for heading, _ in columns:
            cell = WriteOnlyCell(sheet, value=heading)
            cell.font = bold
            headings.append(cell)
        sheet.append(headings)
        return sheet


def _typed(sheet: WriteOnlyWorksheet, values: list[Any]) -> list[Any]:
    return [_text_cell(sheet, value) if isinstance(value, str) else value for value in values]


def _text_cell(sheet: WriteOnlyWorksheet, text: str) -> Cell:
    """A string cell whatever the text looks like: openpyxl infers the type when the value
    is set, so the type is set again after it."""
    shown = printable(text)
    cell = WriteOnlyCell(sheet, value=shown)
    cell.data_type = "s"
    if looks_like_formula(shown):
        cell.quotePrefix = True
    return cell


def _customer_cells(customer: Customer) -> list[Any]:
    return [customer.customer_id, customer.name, customer.status, customer.license_model]


def _totals(usage: CustomerUsage) -> list[int]:
    return _totals_cells(usage.totals)


def _totals_cells(totals: UsageTotals) -> list[int]:
    cells = [
        totals.licensed_users,
        *(totals.device_licenses[basis] for basis in DEVICE_BASES),
        totals.total_device_licenses,
        totals.total_licenses,
    ]
    for name in PACKAGES:
        package = totals.by_package.get(name, PackageTotals())
        cells += [package.licensed_users, package.device_licenses, package.total_licenses]
    return cells


def _excel_time(value: datetime | None, sheet: WriteOnlyWorksheet) -> Cell | None:
    if value is None:
        return None
    cell = WriteOnlyCell(sheet, value=value.astimezone(UTC).replace(tzinfo=None))
    cell.number_format = EXCEL_DATETIME
    return cell

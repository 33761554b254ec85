"""The usage report's output formats: a table for the terminal, JSON and CSV (the Excel
workbook is `worker/report/xlsx.py`). Each writer takes the report in order (the header with
every customer's totals, then each customer's rows) and writes as it goes, so memory stays
bounded however many rows there are."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

import orjson

from worker.licensing.subscription_rules import SeatUsage
from worker.licensing.usage import DEVICE_BASES, UsageTotals
from worker.report.rows import COLUMNS, Customer, ReportRow
from worker.report.safe_text import csv_text, json_printable, printable


@dataclass(frozen=True, slots=True)
class ReportInfo:
    as_of: datetime
    # "live" (the license rows now) or "history" (replayed from the license history).
    source: str
    generated_at: datetime
    release_window_days: int


@dataclass(frozen=True, slots=True)
class CustomerUsage:
    customer: Customer
    totals: UsageTotals
    # Its live subscriptions with seats, as used now (a live report only: not replayed).
    seats: tuple[SeatUsage, ...] = ()


def seats_dict(usage: SeatUsage) -> dict[str, Any]:
    return {
        "subscription_id": usage.subscription_id,
        "package": usage.package,
        "group_id": usage.group_id,
        "seats": usage.seats,
        "used": usage.used,
        "over": usage.over,
    }


def seats_text(usage: SeatUsage) -> str:
    """`s-admins core_plus (group admins): 2 of 1 seats, OVER`."""
    scope = f" (group {usage.group_id})" if usage.group_id else ""
    over = ", OVER" if usage.over else ""
    used = f"{usage.used} of {usage.seats} seats"
    return f"{usage.subscription_id} {usage.package}{scope}: {used}{over}"


class ReportWriter(Protocol):
    def start(
        self, info: ReportInfo, customers: Sequence[CustomerUsage], totals: UsageTotals
    ) -> None: ...

    def start_customer(self, usage: CustomerUsage) -> None: ...

    def row(self, row: ReportRow) -> None: ...

    def end_customer(self) -> None: ...

    def finish(self) -> None: ...

    def abort(self) -> None:
        """The report failed half-way: release what the writer holds."""


def customer_dict(customer: Customer) -> dict[str, Any]:
    return {
        "customer_id": customer.customer_id,
        "name": customer.name,
        "status": customer.status,
        "license_model": customer.license_model,
    }


def row_dict(row: ReportRow) -> dict[str, Any]:
    return {name: getattr(row, name) for name in COLUMNS}


class JsonWriter:
    """One JSON document: the report's header and totals, then `customers`, each with its
    totals and rows. Written a row at a time, one row a line. Values are exact; control and
    invisible characters in them are written as `\\uXXXX` escapes, so the document is also
    safe to print in a terminal."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._customers = 0
        self._rows = 0

    def start(
        self, info: ReportInfo, customers: Sequence[CustomerUsage], totals: UsageTotals
    ) -> None:
        header = {
            "report": "usage",
            "source": info.source,
            "as_of": info.as_of,
            "generated_at": info.generated_at,
            "release_window_days": info.release_window_days,
            "totals": totals.as_dict(),
        }
        self._out.write(_json(header)[:-1] + ',"customers":[')

    def start_customer(self, usage: CustomerUsage) -> None:
        separator = "," if self._customers else ""
        self._out.write(
            f'{separator}\n{{"customer":{_json(customer_dict(usage.customer))},'
            f'"totals":{_json(usage.totals.as_dict())},'
            f'"seats":{_json([seats_dict(seats) for seats in usage.seats])},"rows":['
        )
        self._customers += 1
        self._rows = 0

    def row(self, row: ReportRow) -> None:
        self._out.write(("," if self._rows else "") + "\n" + _json(row_dict(row)))
        self._rows += 1

    def end_customer(self) -> None:
        self._out.write("]}")

    def finish(self) -> None:
        self._out.write("\n]}\n")

    def abort(self) -> None:
        pass


def _json(value: Any) -> str:
    return json_printable(orjson.dumps(value).decode())


class CsvWriter:
    """The detail rows, one table; every row carries its customer id. Times are ISO 8601
    in UTC, booleans `true`/`false`, missing values empty.

    Against CSV injection (OWASP): every text field is quoted, and one that starts with
    `= + - @ TAB CR` gets a `'` in front, so a spreadsheet shows it as text instead of
    running it; control and invisible characters are written as escapes (`\\x1b`). Counts
    are numbers, written unquoted and never prefixed: the report computes them (they are
    never negative) and a number is not a formula."""

    def __init__(self, out: TextIO) -> None:
        self._csv = csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)

    def start(
        self, info: ReportInfo, customers: Sequence[CustomerUsage], totals: UsageTotals
    ) -> None:
        self._csv.writerow(COLUMNS)

    def start_customer(self, usage: CustomerUsage) -> None:
        pass

    def row(self, row: ReportRow) -> None:
        self._csv.writerow([_csv_value(getattr(row, name)) for name in COLUMNS])

    def end_customer(self) -> None:
        pass

    def finish(self) -> None:
        pass

    def abort(self) -> None:
        pass


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, str):
        return csv_text(value)
    return value


# (heading, row attribute, width): values longer than the width push the line out rather
# than being cut, since ids must stay whole.
TABLE_COLUMNS = (
    ("TYPE", "subject_type", 6),
    ("SUBJECT", "subject_id", 30),
    ("USER", "user_id", 28),
    ("KIND", "device_kind", 8),
    ("LICENSED", "licensed", 8),
    ("STATUS", "status", 26),
    ("PACKAGE", "package", 9),
    ("LAST SEEN (UTC)", "last_seen_at", 16),
    ("COVERED", "devices_covered", 7),
    ("EXACT", "last_seen_exact", 5),
)


class TableWriter:
    """For reading in a terminal: each customer's totals, then its rows as columns. Control
    and invisible characters in values (escape sequences, line breaks, bidi overrides) are
    shown as escapes (`\\x1b`, `\\u202e`): the terminal prints them, never obeys them."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._customers = 0
        self._totals = UsageTotals()

    def start(
        self, info: ReportInfo, customers: Sequence[CustomerUsage], totals: UsageTotals
    ) -> None:
        when = _table_time(info.as_of)
        if info.source == "live":
            title = f"Usage report, live, as of {when} UTC"
        else:
            title = (
                f"Usage report as of {when} UTC, replayed from the license and device history "
                "(users, kinds and install states as recorded by then; last seen: the newest "
                "stored signal at or before then, exact where EXACT says yes)"
            )
        self._out.write(f"{title}; release window {info.release_window_days} days\n")
        self._customers = len(customers)
        self._totals = totals

    def start_customer(self, usage: CustomerUsage) -> None:
        customer = usage.customer
        details = [printable(d) for d in (customer.status, customer.license_model) if d]
        described = f" {printable(customer.name)}" if customer.name else ""
        described += f" ({', '.join(details)} model)" if details else ""
        self._out.write(f"\n== {printable(customer.customer_id)}{described}\n")
        self._write_totals(usage.totals)
        for seats in usage.seats:
            self._out.write(f"  seats            {'':>8}   {printable(seats_text(seats))}\n")
        self._out.write("\n" + _table_line([heading for heading, _, _ in TABLE_COLUMNS]))

    def row(self, row: ReportRow) -> None:
        self._out.write(
            _table_line([_table_value(getattr(row, name)) for _, name, _ in TABLE_COLUMNS])
        )

    def end_customer(self) -> None:
        pass

    def finish(self) -> None:
        if self._customers > 1:
            self._out.write(f"\n== all {self._customers} customers\n")
            self._write_totals(self._totals)

    def abort(self) -> None:
        pass

    def _write_totals(self, totals: UsageTotals) -> None:
        reasons = ", ".join(
            f"{basis.replace('_', ' ')} {totals.device_licenses[basis]}" for basis in DEVICE_BASES
        )
        packages = "; ".join(
            f"{printable(name)} {package.total_licenses} (users {package.licensed_users}, "
            f"devices {package.device_licenses})"
            for name, package in sorted(totals.by_package.items())
        )
        self._out.write(
            f"  licensed users   {totals.licensed_users:>8}\n"
            f"  device licenses  {totals.total_device_licenses:>8}   {reasons}\n"
            f"  total licenses   {totals.total_licenses:>8}\n"
            f"  by package       {'':>8}   {packages or '-'}\n"
        )


def _table_line(values: Sequence[str]) -> str:
    cells = [value.ljust(width) for value, (_, _, width) in zip(values, TABLE_COLUMNS, strict=True)]
    return "  " + " ".join(cells).rstrip() + "\n"


def _table_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return _table_time(value)
    return printable(str(value))


def _table_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M")

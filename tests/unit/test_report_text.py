"""`worker.report.safe_text`: what each report format does to a hostile text."""

from __future__ import annotations

import orjson
import pytest

from worker.report.safe_text import csv_text, json_printable, looks_like_formula, printable


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("acme", "acme"),
        ("", ""),
        ("Müller GmbH 😀 東京", "Müller GmbH 😀 東京"),
        ("no\u00a0break", "no\u00a0break"),  # a space separator shows as a space
        ("a\\x1b", "a\\x1b"),  # a backslash is left alone (the table is for reading)
        ("\x1b[2J", "\\x1b[2J"),
        ("line\r\nbreak\ttab", "line\\x0d\\x0abreak\\x09tab"),
        ("\x00\x7f\x85\x9b", "\\x00\\x7f\\x85\\x9b"),
        ("\u202egnp.exe\u2066\u2069", "\\u202egnp.exe\\u2066\\u2069"),
        ("zero\u200bwidth\u200d\ufeff\u00ad", "zero\\u200bwidth\\u200d\\ufeff\\xad"),
        ("\u2028\u2029", "\\u2028\\u2029"),
        ("\U000e0001tag", "\\U000e0001tag"),
        ("\ufffe\uffff", "\\ufffe\\uffff"),  # noncharacters: invalid in XML
        ("\ud800", "\\ud800"),  # a lone surrogate
    ],
)
def test_printable_escapes_controls_and_invisible_formatting(text: str, shown: str) -> None:
    assert printable(text) == shown


@pytest.mark.parametrize(
    ("text", "formula"),
    [
        ("=1+1", True),
        ("+1", True),
        ("-1", True),
        ("@SUM(1)", True),
        ("\t=1", True),
        ("\r=1", True),
        ("a=1", False),
        (" =1", False),
        ("#REF!", False),
        ("", False),
    ],
)
def test_looks_like_formula(text: str, formula: bool) -> None:
    assert looks_like_formula(text) is formula


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("acme", "acme"),
        ('=HYPERLINK("http://x")', '\'=HYPERLINK("http://x")'),
        ("-2+44", "'-2+44"),
        ("@SUM(1,41)", "'@SUM(1,41)"),
        ("\t=1", "'\\x09=1"),
        ("\r=1", "'\\x0d=1"),
        ("a\nb", "a\\x0ab"),
        ("'already", "'already"),
    ],
)
def test_csv_text_prefixes_formula_starts_with_a_quote_and_escapes_controls(
    text: str, field: str
) -> None:
    assert csv_text(text) == field


@pytest.mark.parametrize(
    "value",
    ["plain", "\x7f\x85\x9b", "\u202e\u2028\u2029", "\U000e0001", "😀 Müller", "\x1b\n"],
)
def test_json_printable_is_the_same_json_with_invisible_characters_escaped(value: str) -> None:
    document = orjson.dumps({"name": value}).decode()
    escaped = json_printable(document)
    assert orjson.loads(escaped) == {"name": value}
    assert escaped.isprintable()

"""Report values made safe to show (issue 14, part 2). Ids, customer names and every other
text of a report come from agents and the console, so a report treats them as hostile:

- `printable` shows a control character (C0, DEL, C1: escape sequences, line breaks),
  an invisible format character (bidi overrides and isolates, zero-width characters), a
  line or paragraph separator, a surrogate or an unassigned code point as a Python-style
  escape (`\\x1b`, `\\u202e`, `\\U000e0001`), so a terminal or a spreadsheet shows it
  rather than obeying it. Letters, marks, symbols (emoji) and spaces (including no-break
  spaces) are kept. A backslash is kept too: the escaped form is for reading, and the
  JSON format is the exact one.
- `csv_text` also neutralises a text that starts like a formula, as OWASP's CSV injection
  guidance says: a leading `= + - @ TAB CR` gets a `'` in front.
- `json_printable` escapes the same characters inside a JSON document with JSON's own
  `\\uXXXX`, so the document decodes to the exact values yet is safe to print.
"""

from __future__ import annotations

import unicodedata

# OWASP, CSV Injection: "= + - @", tab (0x09) and carriage return (0x0D).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# What a spreadsheet takes as "text, not a formula" when typed first.
TEXT_MARK = "'"
# Python calls every separator non-printable, but a space of any width shows as a space.
_KEPT_CATEGORIES = frozenset({"Zs"})


def _hidden(character: str) -> bool:
    return not character.isprintable() and unicodedata.category(character) not in _KEPT_CATEGORIES


def _escape(character: str) -> str:
    code = ord(character)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str) -> str:
    if text.isprintable():  # the common case, at C speed
        return text
    return "".join(_escape(ch) if _hidden(ch) else ch for ch in text)


def looks_like_formula(text: str) -> bool:
    return text.startswith(FORMULA_STARTS)


def csv_text(text: str) -> str:
    """A CSV field: the formula check sees the raw text (a leading TAB or CR counts), the
    escapes come after it."""
    shown = printable(text)
    return TEXT_MARK + shown if looks_like_formula(text) else shown


def _json_escape(character: str) -> str:
    code = ord(character)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # a UTF-16 surrogate pair, as JSON spells characters outside the BMP
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def json_printable(document: str) -> str:
    """A compact JSON document (no raw line breaks, as orjson writes it): such characters
    can only be inside its strings, where `\\uXXXX` means the same character."""
    if document.isprintable():
        return document
    return "".join(_json_escape(ch) if _hidden(ch) else ch for ch in document)

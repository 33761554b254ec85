"""The wire contracts as standard JSON Schema (draft 2020-12) documents.

pydantic writes the models' patterns as they are, and the identifier pattern uses Unicode
property classes (`\\p{C}`, `\\p{Z}`): pydantic-core's Rust regex engine knows them, but
Python's `re` does not, and neither does an ECMA-262 regex without the `u` flag, which is
what JSON Schema validators use. The exported documents therefore carry a *portable* form of
each such pattern: the same rule spelled as explicit `\\uXXXX` ranges of the Basic
Multilingual Plane, which compiles in `re`, in ECMA-262 with or without `u`, and in every
validator we know of.

The portable form is a little looser, never stricter: every value the service accepts
matches it, and it refuses every control, format and separator character of the BMP that the
service refuses. What only the service refuses (unassigned and private-use code points, and
format characters outside the BMP) is said in the field's description.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from pydantic import TypeAdapter

from schemas.agent_events import IDENTIFIER_PATTERN

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_ID_PREFIX = "urn:license-telemetry:schema:"

_BMP_END = 0xFFFF
_SURROGATES = range(0xD800, 0xE000)


def _ranges_of(categories: frozenset[str]) -> str:
    """A character-class body of `\\uXXXX` ranges for every BMP character in `categories`."""
    ranges: list[tuple[int, int]] = []
    for code_point in range(_BMP_END + 1):
        if code_point in _SURROGATES:
            continue  # ECMA without `u` sees astral characters as surrogate pairs: keep them
        if unicodedata.category(chr(code_point)) not in categories:
            continue
        if ranges and ranges[-1][1] == code_point - 1:
            ranges[-1] = (ranges[-1][0], code_point)
        else:
            ranges.append((code_point, code_point))
    return "".join(
        f"\\u{first:04X}" if first == last else f"\\u{first:04X}-\\u{last:04X}"
        for first, last in ranges
    )


def _portable_identifier_pattern() -> str:
    # The service: first and last character not C* or Z*, inner ones not Cc, Cf, Zl or Zp.
    # Here: Co (private use) is left out at the edges along with Cn and Cs (see module doc).
    edge = _ranges_of(frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"}))
    inner = _ranges_of(frozenset({"Cc", "Cf", "Zl", "Zp"}))
    # `(?![\s\S])` is the end of the text in every dialect; `$` in Python's `re` also
    # matches before a final newline, which would let "id\n" through a Python validator.
    return f"^[^{edge}](?:[^{inner}]*[^{edge}])?(?![\\s\\S])"


PORTABLE_IDENTIFIER_PATTERN = _portable_identifier_pattern()
IDENTIFIER_NOTE = (
    "No control, format, line or paragraph separator character anywhere, and no space at "
    "either end. The "
    "service also refuses unassigned and private-use code points and format characters "
    f"outside the Basic Multilingual Plane (Unicode {unicodedata.unidata_version})."
)
_PORTABLE_PATTERNS = {IDENTIFIER_PATTERN: (PORTABLE_IDENTIFIER_PATTERN, IDENTIFIER_NOTE)}


def schema_id(file_name: str) -> str:
    """`agent-event.v1.schema.json` -> `urn:license-telemetry:schema:agent-event.v1`."""
    return SCHEMA_ID_PREFIX + file_name.removesuffix(".schema.json")


def contract_json_schema(file_name: str, adapter: TypeAdapter[Any]) -> dict[str, Any]:
    """The committed document for one contract: dialect, id and portable patterns."""
    schema = with_portable_patterns(adapter.json_schema())
    return {"$schema": JSON_SCHEMA_DIALECT, "$id": schema_id(file_name), **schema}


def with_portable_patterns(node: Any) -> Any:
    if isinstance(node, list):
        return [with_portable_patterns(item) for item in node]
    if not isinstance(node, dict):
        return node
    rewritten = {key: with_portable_patterns(value) for key, value in node.items()}
    pattern = rewritten.get("pattern")
    if isinstance(pattern, str) and pattern in _PORTABLE_PATTERNS:
        rewritten["pattern"], note = _PORTABLE_PATTERNS[pattern]
        description = rewritten.get("description")
        rewritten["description"] = f"{description} {note}" if description else note
    return rewritten

"""The exported JSON Schemas load and validate in standard validators (issue #18 part 4).

The committed files are checked as a billing team would use them: compiled by Python's `re`,
by an ECMA-262 engine (regress, the one check-jsonschema uses) with and without the `u` flag,
and loaded by jsonschema's draft 2020-12 validator, which must agree with the service on what
is valid.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import regress
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from schemas.agent_events import AGENT_EVENT_ADAPTER
from schemas.export import CONTRACTS
from schemas.json_schema import JSON_SCHEMA_DIALECT, PORTABLE_IDENTIFIER_PATTERN, schema_id

SCHEMA_DIRECTORY = Path(__file__).parents[2] / "schemas" / "json"


def committed(file_name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = orjson.loads((SCHEMA_DIRECTORY / file_name).read_bytes())
    return loaded


def patterns_in(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str):
                yield value
            else:
                yield from patterns_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from patterns_in(item)


@pytest.mark.parametrize("file_name", list(CONTRACTS))
def test_every_pattern_compiles_in_python_and_ecma_regex(file_name: str) -> None:
    patterns = set(patterns_in(committed(file_name)))
    for pattern in patterns:
        assert "\\p{" not in pattern
        re.compile(pattern)
        regress.Regex(pattern)
        regress.Regex(pattern, "u")


@pytest.mark.parametrize("file_name", list(CONTRACTS))
def test_every_schema_names_its_dialect_and_id(file_name: str) -> None:
    schema = committed(file_name)
    assert schema["$schema"] == JSON_SCHEMA_DIALECT
    assert schema["$id"] == schema_id(file_name)
    Draft202012Validator.check_schema(schema)


def a_heartbeat(**changes: Any) -> dict[str, Any]:
    event = {
        "schema_version": 1,
        "type": "heartbeat",
        "event_id": "evt-1",
        "customer_id": "cust-1",
        "device_id": "dev-1",
        "occurred_at": "2026-11-30T10:00:00Z",
    }
    return event | changes


@pytest.mark.parametrize(
    ("customer_id", "valid"),
    [
        ("contoso", True),
        ("Contoso Ltd", True),
        ("ÄÖÜ-株式会社", True),
        ("emoji-😀", True),
        (" leading", False),
        ("trailing ", False),
        ("bidi\u202eoverride", False),
        ("zero\u200bwidth", False),
        ("line\nbreak", False),
        ("trailing-newline\n", False),
        ("nul\x00", False),
        ("", False),
    ],
)
def test_the_exported_schema_agrees_with_the_service(customer_id: str, valid: bool) -> None:
    event = a_heartbeat(customer_id=customer_id)
    validator = Draft202012Validator(committed("agent-event.v1.schema.json"))
    assert validator.is_valid(event) is valid
    try:
        AGENT_EVENT_ADAPTER.validate_python(event)
        accepted = True
    except ValidationError:
        accepted = False
    assert accepted is valid


def service_accepts(identifier: str) -> bool:
    try:
        AGENT_EVENT_ADAPTER.validate_python(a_heartbeat(device_id=identifier))
    except ValidationError:
        return False
    return True


def is_ordinary(character: str) -> bool:
    """Assigned, not private use, not a surrogate, in the BMP: where both rules must agree."""
    return ord(character) <= 0xFFFF and unicodedata.category(character) not in {"Cn", "Co", "Cs"}


@settings(max_examples=400, deadline=None)
@given(st.text(min_size=1, max_size=12))
def test_the_portable_pattern_is_never_stricter_than_the_service(identifier: str) -> None:
    portable = regress.Regex(PORTABLE_IDENTIFIER_PATTERN, "u").find(identifier) is not None
    if service_accepts(identifier):
        assert portable
    elif all(is_ordinary(character) for character in identifier):
        assert not portable, "on ordinary characters both rules agree"

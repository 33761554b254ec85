"""`schemas.agent_events`: the inbound wire contract as pydantic models."""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from schemas import AGENT_EVENT_ADAPTER, DeviceKind, Heartbeat, Install, Uninstall, UserProfile
from schemas.agent_events import MAX_ID_LENGTH, MAX_TEXT_LENGTH
from schemas.export import CONTRACTS, export_json_schemas
from schemas.json_schema import contract_json_schema

AT = datetime(2026, 11, 28, 17, 0, tzinfo=UTC)
SCHEMA_DIRECTORY = Path(__file__).parents[2] / "schemas" / "json"
COMMITTED_SCHEMA = SCHEMA_DIRECTORY / "agent-event.v1.schema.json"
ID_FIELDS = ["event_id", "customer_id", "device_id", "user_id"]


def heartbeat(**fields: Any) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "event_id": "evt-1",
        "type": "heartbeat",
        "customer_id": "cust-1",
        "device_id": "dev-1",
        "occurred_at": AT.isoformat(),
        **fields,
    }


def is_valid(document: dict[str, Any]) -> bool:
    try:
        AGENT_EVENT_ADAPTER.validate_python(document)
    except ValidationError:
        return False
    return True


def reference_identifier_rule(text: str) -> bool:
    """The rule the schema's comment states, written out in plain Python."""
    inner_forbidden = {"Cc", "Cf", "Zl", "Zp"}

    def edge_forbidden(character: str) -> bool:
        return unicodedata.category(character)[0] in {"C", "Z"}

    return (
        1 <= len(text) <= MAX_ID_LENGTH
        and not any(unicodedata.category(character) in inner_forbidden for character in text)
        and not edge_forbidden(text[0])
        and not edge_forbidden(text[-1])
    )


@pytest.mark.parametrize(
    ("identifier", "valid"),
    [
        ("a", True),
        ("a" * MAX_ID_LENGTH, True),
        ("a" * (MAX_ID_LENGTH + 1), False),
        ("", False),
        ("a b", True),
        ("a  b", True),
        (" a", False),
        ("a ", False),
        (" ", False),
        ("a\x00b", False),
        ("\x00", False),
        ("a\tb", False),
        ("a\nb", False),
        ("a\rb", False),
        ("a\x1fb", False),
        ("a\x7fb", False),
        ("\x7f", False),
        ("ünïcødé", True),
        ("端末-1", True),
        ("emoji-🙂", True),
    ],
)
@pytest.mark.parametrize("field", ID_FIELDS)
def test_identifier_rule(field: str, identifier: str, valid: bool) -> None:
    assert is_valid(heartbeat(**{field: identifier})) is valid


@settings(max_examples=300, deadline=None)
@given(
    identifier=st.text(
        alphabet=st.characters(max_codepoint=0x2FF, exclude_categories=["Cs"]), max_size=210
    )
    | st.text(alphabet="a \t\x00\x7f", max_size=4)
)
def test_identifier_pattern_matches_the_stated_rule(identifier: str) -> None:
    assert is_valid(heartbeat(device_id=identifier)) is reference_identifier_rule(identifier)


@pytest.mark.parametrize(
    "identifier",
    ["dev\x85", "\x9fdev", "a\x85b", "\u00a0dev", "dev\u2028", "dev\u3000"],
    ids=["nel-suffix", "c1-prefix", "nel-inside", "nbsp-prefix", "line-separator", "ideographic"],
)
def test_identifier_rejects_unicode_controls_and_white_space(identifier: str) -> None:
    assert not is_valid(heartbeat(device_id=identifier))


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("", True),
        ("x" * MAX_TEXT_LENGTH, True),
        ("x" * (MAX_TEXT_LENGTH + 1), False),
        (" padded ", True),
        ("line\nbreak", True),
        ("nul\x00", False),
    ],
)
@pytest.mark.parametrize("field", ["hostname", "os"])
def test_free_text_rule(field: str, text: str, valid: bool) -> None:
    document = heartbeat(type="install", device_kind="business", hostname="h", os="o")
    document[field] = text
    assert is_valid(document) is valid


@pytest.mark.parametrize(
    ("fields", "names_user", "user_id"),
    [
        ({}, False, None),
        ({"user_id": None}, True, None),
        ({"user_id": "alice"}, True, "alice"),
    ],
    ids=["absent", "null", "named"],
)
@pytest.mark.parametrize("event_type", ["heartbeat", "uninstall"])
def test_names_user(
    event_type: str, fields: dict[str, Any], names_user: bool, user_id: str | None
) -> None:
    event = AGENT_EVENT_ADAPTER.validate_python(heartbeat(type=event_type, **fields))
    assert event.names_user is names_user
    assert event.user_id == user_id


def test_names_user_of_an_install() -> None:
    install = heartbeat(type="install", device_kind="personal", hostname="h", os="o")
    assert AGENT_EVENT_ADAPTER.validate_python(install).names_user is False
    assert AGENT_EVENT_ADAPTER.validate_python({**install, "user_id": None}).names_user is True


@pytest.mark.parametrize(
    ("document", "model"),
    [
        (heartbeat(), Heartbeat),
        (heartbeat(type="install", device_kind="business", hostname="h", os="o"), Install),
        (heartbeat(type="uninstall"), Uninstall),
    ],
    ids=["heartbeat", "install", "uninstall"],
)
def test_discriminator_picks_the_model(document: dict[str, Any], model: type) -> None:
    assert type(AGENT_EVENT_ADAPTER.validate_python(document)) is model


def test_models_are_frozen() -> None:
    event = AGENT_EVENT_ADAPTER.validate_python(heartbeat())
    with pytest.raises(ValidationError):
        event.device_id = "other"  # type: ignore[misc]
    profile = UserProfile(email="a@b.example")
    with pytest.raises(ValidationError):
        profile.email = "other"  # type: ignore[misc]


def test_extra_fields_are_dropped_at_every_level() -> None:
    document = heartbeat(
        type="install",
        device_kind="business",
        hostname="h",
        os="o",
        serial_number="SN-1",
        user={"email": "a@b.example", "phone": "+1 555 0100"},
    )
    dumped = AGENT_EVENT_ADAPTER.validate_python(document).model_dump()
    assert "serial_number" not in dumped
    assert dumped["user"] == {"email": "a@b.example", "display_name": None}


def test_device_kind_values() -> None:
    assert [kind.value for kind in DeviceKind] == ["business", "personal"]
    assert DeviceKind("personal") is DeviceKind.PERSONAL


def test_install_requires_its_details() -> None:
    with pytest.raises(ValidationError) as raised:
        AGENT_EVENT_ADAPTER.validate_python(heartbeat(type="install"))
    missing = {error["loc"][-1] for error in raised.value.errors() if error["type"] == "missing"}
    assert missing == {"device_kind", "hostname", "os"}


@pytest.mark.parametrize(("file_name", "adapter"), list(CONTRACTS.items()), ids=list(CONTRACTS))
def test_committed_json_schema_matches_the_models(
    file_name: str, adapter: TypeAdapter[Any]
) -> None:
    committed = orjson.loads((SCHEMA_DIRECTORY / file_name).read_bytes())
    expected = contract_json_schema(file_name, adapter)
    assert committed == expected, "run `make schemas` and commit"


def test_agent_event_contract_is_exported() -> None:
    assert CONTRACTS[COMMITTED_SCHEMA.name] is AGENT_EVENT_ADAPTER


def test_export_writes_every_contract(tmp_path: Path) -> None:
    written = export_json_schemas(tmp_path / "out")
    assert [path.name for path in written] == list(CONTRACTS)
    for path in written:
        assert orjson.loads(path.read_bytes()) == contract_json_schema(
            path.name, CONTRACTS[path.name]
        )


def test_export_is_byte_for_byte_reproducible(tmp_path: Path) -> None:
    first = export_json_schemas(tmp_path / "first")[0].read_bytes()
    second = export_json_schemas(tmp_path / "second")[0].read_bytes()
    assert first == second

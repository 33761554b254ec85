"""`worker.ingest.decoding.decode_agent_event`: raw Kafka bytes to a model, or why it is not."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.agent_events import DeviceKind, Heartbeat, Install, Uninstall, UserProfile
from worker.ingest import decoding
from worker.ingest.decoding import (
    MAX_DETAIL_LENGTH,
    Rejection,
    RejectReason,
    decode_admin_event,
    decode_agent_event,
)
from worker.sim.fleet import SimulatedDevice, agent_event, console_events

MAX_BYTES = 65_536
AT = datetime(2026, 11, 28, 17, 0, tzinfo=UTC)
EMAIL = "alice@contoso.example"
DEVICE = SimulatedDevice("cust-042", "dev-7f3a", EMAIL, "personal")
ABSENT: Any = object()  # marks a field to remove from the document


def document(event_type: str = "heartbeat", **changes: Any) -> dict[str, Any]:
    doc = agent_event(DEVICE, event_type, AT)
    for name, value in changes.items():
        if value is ABSENT:
            doc.pop(name, None)
        else:
            doc[name] = value
    return doc


def decode_document(doc: object, max_bytes: int = MAX_BYTES) -> object:
    return decode_agent_event(orjson.dumps(doc), max_bytes)


def rejected(result: object) -> Rejection:
    assert isinstance(result, Rejection), f"expected a Rejection, got {result!r}"
    return result


# --- valid messages -------------------------------------------------------------------------


def test_contract_example_is_a_heartbeat() -> None:
    value = b"""{
      "schema_version": 1,
      "event_id": "8f0c6a1e-3b9e-4e55-9a53-1b4f4cbd2a10",
      "type": "heartbeat",
      "customer_id": "cust-042",
      "device_id": "dev-7f3a",
      "user_id": "alice@contoso.example",
      "occurred_at": "2026-11-28T17:00:00Z",
      "agent_version": "5.3.1"
    }"""
    event = decode_agent_event(value, MAX_BYTES)
    assert event == Heartbeat(
        schema_version=1,
        event_id="8f0c6a1e-3b9e-4e55-9a53-1b4f4cbd2a10",
        type="heartbeat",
        customer_id="cust-042",
        device_id="dev-7f3a",
        user_id="alice@contoso.example",
        occurred_at=AT,
        agent_version="5.3.1",
    )


@pytest.mark.parametrize(
    ("doc", "user_id", "names_user"),
    [
        pytest.param(document(user_id=EMAIL), EMAIL, True, id="user-named"),
        pytest.param(document(user_id=None), None, True, id="explicit-null"),
        pytest.param(document(user_id=ABSENT), None, False, id="absent"),
    ],
)
def test_heartbeat_user_id(doc: dict[str, Any], user_id: str | None, names_user: bool) -> None:
    event = decode_document(doc)
    assert isinstance(event, Heartbeat)
    assert event.user_id == user_id
    assert event.names_user is names_user


@pytest.mark.parametrize(
    ("doc", "expected_class"),
    [
        (document("heartbeat"), Heartbeat),
        (document("install"), Install),
        (document("uninstall"), Uninstall),
    ],
    ids=["heartbeat", "install", "uninstall"],
)
def test_type_selects_the_model(doc: dict[str, Any], expected_class: type) -> None:
    event = decode_document(doc)
    assert type(event) is expected_class
    assert event.type == doc["type"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("doc", "kind"),
    [
        (document(), None),
        (document(device_kind="personal"), DeviceKind.PERSONAL),
        (document(device_kind="business"), DeviceKind.BUSINESS),
        (document(device_kind=None), None),
    ],
    ids=["absent", "personal", "business", "null"],
)
def test_heartbeat_may_carry_device_kind(doc: dict[str, Any], kind: DeviceKind | None) -> None:
    event = decode_document(doc)
    assert isinstance(event, Heartbeat)
    assert event.device_kind == kind


def test_install_with_user_profile() -> None:
    event = decode_document(document("install", user={"email": EMAIL, "display_name": "Alice"}))
    assert isinstance(event, Install)
    assert event.device_kind is DeviceKind.PERSONAL
    assert event.hostname == "host-dev-7f3a"
    assert event.os == "windows-11"
    assert event.user == UserProfile(email=EMAIL, display_name="Alice")


@pytest.mark.parametrize(
    "doc",
    [
        document("install", user=ABSENT),
        document("install", user=None),
    ],
    ids=["absent", "null"],
)
def test_install_without_user_profile(doc: dict[str, Any]) -> None:
    event = decode_document(doc)
    assert isinstance(event, Install)
    assert event.user is None


@pytest.mark.parametrize(
    "user",
    [{}, {"email": None}, {"display_name": "Alice"}, {"email": EMAIL, "phone": "+1 555"}],
    ids=["empty", "null-email", "name-only", "extra-field"],
)
def test_install_user_profile_fields_are_optional(user: dict[str, Any]) -> None:
    event = decode_document(document("install", user=user))
    assert isinstance(event, Install)
    assert event.user is not None
    assert event.user.email == user.get("email")
    assert event.user.display_name == user.get("display_name")
    assert "phone" not in event.user.model_dump()


@pytest.mark.parametrize("event_type", ["heartbeat", "install", "uninstall"])
def test_unknown_extra_fields_are_ignored(event_type: str) -> None:
    extra = {"battery": 42, "geo": {"lat": 1.5, "lon": 2.5}, "tags": ["a"], "note": None}
    event = decode_document(document(event_type, **extra))
    assert not isinstance(event, Rejection)
    dumped = event.model_dump()  # type: ignore[attr-defined]
    assert set(extra).isdisjoint(dumped)


@pytest.mark.parametrize(
    ("occurred_at", "expected"),
    [
        ("2026-11-28T17:00:00Z", AT),
        ("2026-11-28T17:00:00+00:00", AT),
        ("2026-11-28T19:00:00+02:00", AT),
        ("2026-11-28T12:00:00-05:00", AT),
        ("2026-11-28T17:00:00.123456Z", AT + timedelta(microseconds=123456)),
    ],
)
def test_occurred_at_is_aware(occurred_at: str, expected: datetime) -> None:
    event = decode_document(document(occurred_at=occurred_at))
    assert isinstance(event, Heartbeat)
    assert event.occurred_at == expected
    assert event.occurred_at.utcoffset() is not None


def test_offset_of_the_agent_clock_is_kept() -> None:
    event = decode_document(document(occurred_at="2026-11-28T19:00:00+02:00"))
    assert isinstance(event, Heartbeat)
    assert event.occurred_at.utcoffset() == timedelta(hours=2)
    assert event.occurred_at == AT


@pytest.mark.parametrize(
    "identifier",
    ["a", "x" * 200, "dev 1 with spaces", "ünïcødé-端末", "8f0c6a1e-3b9e-4e55-9a53-1b4f4cbd2a10"],
    ids=["one-char", "200-chars", "inner-spaces", "non-ascii", "uuid"],
)
@pytest.mark.parametrize("field", ["event_id", "customer_id", "device_id", "user_id"])
def test_valid_identifiers_round_trip(field: str, identifier: str) -> None:
    event = decode_document(document(**{field: identifier}))
    assert isinstance(event, Heartbeat)
    assert getattr(event, field) == identifier


def test_message_of_exactly_max_bytes_is_accepted() -> None:
    value = orjson.dumps(document())
    padded = value + b" " * (MAX_BYTES - len(value))
    assert len(padded) == MAX_BYTES
    assert isinstance(decode_agent_event(padded, MAX_BYTES), Heartbeat)


# --- rejections before parsing ---------------------------------------------------------------


@pytest.mark.parametrize("value", [None, b""], ids=["none", "empty-bytes"])
def test_empty_value_is_rejected(value: bytes | None) -> None:
    assert rejected(decode_agent_event(value, MAX_BYTES)).reason is RejectReason.EMPTY


def test_empty_is_reported_before_size() -> None:
    assert rejected(decode_agent_event(b"", 0)).reason is RejectReason.EMPTY


@pytest.mark.parametrize(
    "value",
    [
        b"x" * (MAX_BYTES + 1),
        orjson.dumps(document()) + b" " * MAX_BYTES,
        b"\xff" * (MAX_BYTES + 1),
        b"[" * (MAX_BYTES + 1),
    ],
    ids=["garbage", "valid-json-padded", "invalid-utf8", "deep-nesting"],
)
def test_oversized_value_is_rejected(value: bytes) -> None:
    rejection = rejected(decode_agent_event(value, MAX_BYTES))
    assert rejection.reason is RejectReason.OVERSIZED
    assert rejection.detail == f"{len(value)} bytes exceeds {MAX_BYTES}"


def test_oversized_value_is_rejected_without_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_parse(value: bytes) -> object:
        raise AssertionError("an oversized message was parsed")

    monkeypatch.setattr(decoding.orjson, "loads", must_not_parse)
    ten_megabytes = b'{"schema_version": 1, "pad": "' + b"x" * 10_000_000 + b'"}'
    started = time.perf_counter()
    rejection = rejected(decode_agent_event(ten_megabytes, MAX_BYTES))
    elapsed = time.perf_counter() - started
    assert rejection.reason is RejectReason.OVERSIZED
    assert elapsed < 0.5


# --- rejections while parsing ----------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        b"\xff",
        b"\xff\xfe{}",
        b'{"user_id": "alice\xff@contoso.example"}',
        b'{"a": "\xc3"}',  # truncated two-byte sequence
        b'{"a": "\xc0\xaf"}',  # overlong encoding of "/"
        b'{"a": "\xed\xa0\x80"}',  # UTF-8 encoded surrogate
        b'{"a": "\xf4\x90\x80\x80"}',  # above U+10FFFF
        b"\x80not-json",
    ],
    ids=["ff", "utf16-bom", "in-string", "truncated", "overlong", "surrogate", "too-high", "80"],
)
def test_invalid_utf8_is_rejected(value: bytes) -> None:
    rejection = rejected(decode_agent_event(value, MAX_BYTES))
    assert rejection.reason is RejectReason.INVALID_UTF8
    assert "utf-8" in rejection.detail


@pytest.mark.parametrize(
    "value",
    [
        b"{",
        b"}",
        b"not json",
        b"   ",
        b"\x00",
        b"{'schema_version': 1}",
        b'{"schema_version": 1,}',
        b'{"a": 1} {"b": 2}',
        b"NaN",
        b"Infinity",
        b"1e400",
        b'"\\ud800"',
        b"\xef\xbb\xbf{}",
        b'{"a": "tab\there"}',
    ],
    ids=[
        "open-brace",
        "close-brace",
        "words",
        "whitespace",
        "nul",
        "single-quotes",
        "trailing-comma",
        "two-documents",
        "nan",
        "infinity",
        "overflowing-number",
        "lone-surrogate-escape",
        "utf8-bom",
        "raw-control-char-in-string",
    ],
)
def test_invalid_json_is_rejected(value: bytes) -> None:
    assert rejected(decode_agent_event(value, MAX_BYTES)).reason is RejectReason.INVALID_JSON


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (b"[]", "list"),
        (b"[{}]", "list"),
        (b"42", "int"),
        (b"-1.5", "float"),
        (b'"heartbeat"', "str"),
        (b"null", "NoneType"),
        (b"true", "bool"),
        (b"[" + orjson.dumps(document()) + b"]", "list"),
    ],
    ids=["empty-list", "list-of-object", "int", "float", "string", "null", "bool", "wrapped"],
)
def test_json_that_is_not_an_object_is_rejected(value: bytes, type_name: str) -> None:
    rejection = rejected(decode_agent_event(value, MAX_BYTES))
    assert rejection.reason is RejectReason.NOT_AN_OBJECT
    assert rejection.detail == f"top level is {type_name}"


# --- rejections while validating -------------------------------------------------------------


@pytest.mark.parametrize(
    "version",
    [2, 0, -1, 99, "1", "v1", None, [1], {"major": 1}, 1.5],
    ids=["2", "0", "-1", "99", "string-1", "v1", "null", "list", "object", "1.5"],
)
def test_unsupported_schema_version_is_rejected(version: object) -> None:
    rejection = rejected(decode_document(document(schema_version=version)))
    assert rejection.reason is RejectReason.UNSUPPORTED_SCHEMA_VERSION
    assert rejection.detail.startswith("schema_version ")


def test_schema_version_is_checked_before_type() -> None:
    rejection = rejected(decode_document(document(schema_version=2, type="reboot")))
    assert rejection.reason is RejectReason.UNSUPPORTED_SCHEMA_VERSION


def test_missing_schema_version_is_a_schema_violation() -> None:
    rejection = rejected(decode_document(document(schema_version=ABSENT)))
    assert rejection.reason is RejectReason.SCHEMA_VIOLATION
    assert "schema_version" in rejection.detail


@pytest.mark.parametrize(
    "event_type",
    ["reboot", "Heartbeat", "HEARTBEAT", " heartbeat", "", None, 5, ["heartbeat"], {}, ABSENT],
    ids=[
        "reboot",
        "capitalised",
        "upper",
        "space",
        "empty",
        "null",
        "int",
        "list",
        "obj",
        "absent",
    ],
)
def test_unknown_or_missing_type_is_rejected(event_type: object) -> None:
    rejection = rejected(decode_document(document(type=event_type)))
    assert rejection.reason is RejectReason.UNKNOWN_TYPE
    assert "type" in rejection.detail


SCHEMA_VIOLATIONS = [
    # (id, document, a field location that the detail must name)
    ("missing-customer_id", document(customer_id=ABSENT), "customer_id"),
    ("missing-event_id", document(event_id=ABSENT), "event_id"),
    ("missing-device_id", document("uninstall", device_id=ABSENT), "device_id"),
    ("missing-occurred_at", document(occurred_at=ABSENT), "occurred_at"),
    ("empty-customer_id", document(customer_id=""), "customer_id"),
    ("empty-event_id", document(event_id=""), "event_id"),
    ("empty-device_id", document(device_id=""), "device_id"),
    ("empty-user_id", document(user_id=""), "user_id"),
    ("201-char-customer_id", document(customer_id="c" * 201), "customer_id"),
    ("201-char-event_id", document(event_id="e" * 201), "event_id"),
    ("201-char-device_id", document(device_id="d" * 201), "device_id"),
    ("201-char-user_id", document(user_id="u" * 201), "user_id"),
    ("nul-in-device_id", document(device_id="dev\x00-1"), "device_id"),
    ("nul-only-customer_id", document(customer_id="\x00"), "customer_id"),
    ("tab-in-user_id", document(user_id="alice\t@contoso"), "user_id"),
    ("newline-in-event_id", document(event_id="evt\n1"), "event_id"),
    ("crlf-at-end-device_id", document(device_id="dev-1\r\n"), "device_id"),
    ("escape-in-customer_id", document(customer_id="cust\x1b[31m"), "customer_id"),
    ("del-in-device_id", document(device_id="dev\x7f"), "device_id"),
    ("leading-space-customer_id", document(customer_id=" cust-042"), "customer_id"),
    ("trailing-space-device_id", document(device_id="dev-7f3a "), "device_id"),
    ("only-space-user_id", document(user_id=" "), "user_id"),
    ("number-customer_id", document(customer_id=42), "customer_id"),
    ("float-device_id", document(device_id=4.2), "device_id"),
    ("bool-event_id", document(event_id=True), "event_id"),
    ("number-user_id", document(user_id=7), "user_id"),
    ("list-customer_id", document(customer_id=["cust-042"]), "customer_id"),
    ("object-device_id", document(device_id={"id": "dev"}), "device_id"),
    ("null-customer_id", document(customer_id=None), "customer_id"),
    ("naive-occurred_at", document(occurred_at="2026-11-28T17:00:00"), "occurred_at"),
    ("date-only-occurred_at", document(occurred_at="2026-11-28"), "occurred_at"),
    ("words-occurred_at", document(occurred_at="yesterday"), "occurred_at"),
    ("empty-occurred_at", document(occurred_at=""), "occurred_at"),
    ("month-13-occurred_at", document(occurred_at="2026-13-01T00:00:00Z"), "occurred_at"),
    ("null-occurred_at", document(occurred_at=None), "occurred_at"),
    ("long-agent_version", document(agent_version="5" * 513), "agent_version"),
    ("nul-agent_version", document(agent_version="5.3\x00"), "agent_version"),
    ("number-agent_version", document(agent_version=5.3), "agent_version"),
    ("bad-heartbeat-device_kind", document(device_kind="laptop"), "device_kind"),
    ("install-missing-device_kind", document("install", device_kind=ABSENT), "device_kind"),
    ("install-missing-hostname", document("install", hostname=ABSENT), "hostname"),
    ("install-missing-os", document("install", os=ABSENT), "os"),
    ("install-null-device_kind", document("install", device_kind=None), "device_kind"),
    ("install-bad-device_kind", document("install", device_kind="laptop"), "device_kind"),
    ("install-upper-device_kind", document("install", device_kind="BUSINESS"), "device_kind"),
    ("install-nul-hostname", document("install", hostname="host\x00"), "hostname"),
    ("install-513-char-os", document("install", os="o" * 513), "os"),
    ("install-user-is-string", document("install", user=EMAIL), "user"),
    ("install-user-is-list", document("install", user=[EMAIL]), "user"),
    ("install-nul-email", document("install", user={"email": "a\x00@b"}), "user.email"),
    ("install-long-name", document("install", user={"display_name": "n" * 513}), "display_name"),
]


@pytest.mark.parametrize(
    ("doc", "location"),
    [pytest.param(doc, location, id=case_id) for case_id, doc, location in SCHEMA_VIOLATIONS],
)
def test_schema_violation_is_rejected(doc: dict[str, Any], location: str) -> None:
    rejection = rejected(decode_document(doc))
    assert rejection.reason is RejectReason.SCHEMA_VIOLATION
    assert location in rejection.detail


def test_detail_names_every_violated_field() -> None:
    rejection = rejected(decode_document(document(customer_id="", device_id=ABSENT)))
    assert "heartbeat.customer_id" in rejection.detail
    assert "heartbeat.device_id: Field required" in rejection.detail


# --- the detail: bounded, and never the message content -------------------------------------


LEAKY_INPUTS = [
    # (id, document with the e-mail address in a bad value)
    ("leading-space-customer_id", document(customer_id=f" {EMAIL}")),
    ("too-long-device_id", document(device_id=EMAIL * 10)),
    ("nul-in-user_id", document(user_id=f"{EMAIL}\x00")),
    ("newline-in-event_id", document(event_id=f"\n{EMAIL}")),
    ("occurred_at", document(occurred_at=EMAIL)),
    ("agent_version", document(agent_version=EMAIL * 30)),
    ("heartbeat-device_kind", document(device_kind=EMAIL)),
    ("install-device_kind", document("install", device_kind=EMAIL)),
    ("install-user-as-string", document("install", user=EMAIL)),
    ("install-email-with-nul", document("install", user={"email": f"{EMAIL}\x00"})),
    ("install-hostname-with-nul", document("install", hostname=f"{EMAIL}\x00")),
    ("install-missing-os", document("install", os=ABSENT, hostname=EMAIL)),
]


@pytest.mark.parametrize("doc", [pytest.param(doc, id=case_id) for case_id, doc in LEAKY_INPUTS])
def test_detail_does_not_repeat_input_values(doc: dict[str, Any]) -> None:
    rejection = rejected(decode_document(doc))
    assert rejection.reason is RejectReason.SCHEMA_VIOLATION
    assert EMAIL not in rejection.detail
    assert "alice" not in rejection.detail


@pytest.mark.parametrize(
    "value",
    [
        b'{"user_id": "alice@contoso.example", oops}',
        b'{"user_id": "alice@contoso.example\xff"}',
        b'["alice@contoso.example"]',
    ],
    ids=["invalid-json", "invalid-utf8", "not-an-object"],
)
def test_parse_error_detail_does_not_repeat_the_message(value: bytes) -> None:
    rejection = rejected(decode_agent_event(value, MAX_BYTES))
    assert "alice" not in rejection.detail


def test_unknown_type_detail_does_not_repeat_the_type_value() -> None:
    rejection = rejected(decode_document(document(type=EMAIL)))
    assert rejection.reason is RejectReason.UNKNOWN_TYPE
    assert EMAIL not in rejection.detail


def test_unsupported_schema_version_detail_does_not_repeat_a_string_value() -> None:
    rejection = rejected(decode_document(document(schema_version=EMAIL)))
    assert rejection.reason is RejectReason.UNSUPPORTED_SCHEMA_VERSION
    assert EMAIL not in rejection.detail


def test_unsupported_schema_version_detail_is_bounded() -> None:
    rejection = rejected(decode_document(document(schema_version="9" * 10_000)))
    assert rejection.reason is RejectReason.UNSUPPORTED_SCHEMA_VERSION
    assert len(rejection.detail) <= len("schema_version ") + 50


def test_detail_of_many_violations_names_each_within_the_limit() -> None:
    doc = document(
        "install",
        event_id=" x",
        customer_id=" x",
        device_id=" x",
        user_id=" x",
        occurred_at="nope",
        agent_version="\x00",
        device_kind="laptop",
        hostname="\x00",
        os="\x00",
        user={"email": "\x00", "display_name": "\x00"},
    )
    rejection = rejected(decode_document(doc))
    assert rejection.reason is RejectReason.SCHEMA_VIOLATION
    assert len(rejection.detail) <= MAX_DETAIL_LENGTH
    for location in ["event_id", "customer_id", "device_id", "user_id", "occurred_at"]:
        assert f"install.{location}:" in rejection.detail
    assert "install.user.display_name:" in rejection.detail


def test_long_detail_is_truncated_to_the_limit() -> None:
    from worker.ingest.decoding import _bounded

    assert _bounded("x" * 5000) == "x" * (MAX_DETAIL_LENGTH - 3) + "..."
    assert _bounded("short") == "short"


def test_rejection_is_a_frozen_value() -> None:
    rejection = Rejection(RejectReason.EMPTY, "message has no value")
    assert rejection == rejected(decode_agent_event(None, MAX_BYTES))
    with pytest.raises(AttributeError):
        rejection.detail = "changed"  # type: ignore[misc]


def test_reject_reasons_are_stable_labels() -> None:
    assert {reason.value for reason in RejectReason} == {
        "oversized",
        "empty",
        "invalid_utf8",
        "invalid_json",
        "not_an_object",
        "unsupported_schema_version",
        "unknown_type",
        "schema_violation",
        "database_rejected",
        "unknown_subscription",
        "unauthenticated",
        "unknown_customer",
    }


# --- properties -----------------------------------------------------------------------------

MODELS = (Heartbeat, Install, Uninstall)
MARKER = "PII-MARKER"

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


def assert_well_formed(result: object) -> None:
    assert isinstance(result, (*MODELS, Rejection))
    if isinstance(result, Rejection):
        assert isinstance(result.reason, RejectReason)
        assert result.reason is not RejectReason.DATABASE_REJECTED
        assert len(result.detail) <= MAX_DETAIL_LENGTH


@settings(max_examples=300, deadline=None)
@given(value=st.binary(max_size=300), max_bytes=st.integers(min_value=0, max_value=400))
def test_arbitrary_bytes_never_raise(value: bytes, max_bytes: int) -> None:
    assert_well_formed(decode_agent_event(value, max_bytes))


@settings(max_examples=200, deadline=None)
@given(value=json_values)
def test_arbitrary_json_never_raises(value: object) -> None:
    assert_well_formed(decode_agent_event(orjson.dumps(value), MAX_BYTES))


@settings(max_examples=300, deadline=None)
@given(
    event_type=st.sampled_from(["heartbeat", "install", "uninstall"]),
    field=st.sampled_from(
        [
            "event_id",
            "customer_id",
            "device_id",
            "user_id",
            "occurred_at",
            "agent_version",
            "device_kind",
            "hostname",
            "os",
            "user",
        ]
    ),
    value=json_values | st.text(max_size=20).map(lambda text: f"{text}{MARKER}{text}"),
)
def test_one_bad_field_is_a_schema_violation_that_does_not_echo_it(
    event_type: str, field: str, value: object
) -> None:
    result = decode_document(document(event_type, **{field: value}))
    assert_well_formed(result)
    if isinstance(result, Rejection):
        assert result.reason is RejectReason.SCHEMA_VIOLATION
        assert MARKER not in result.detail


printable_ids = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=200
)


@settings(max_examples=200, deadline=None)
@given(
    event_id=printable_ids,
    customer_id=printable_ids,
    device_id=printable_ids,
    user_id=st.none() | printable_ids,
    occurred_at=st.datetimes(
        min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    ),
)
def test_valid_heartbeats_round_trip(
    event_id: str, customer_id: str, device_id: str, user_id: str | None, occurred_at: datetime
) -> None:
    doc = document(
        event_id=event_id,
        customer_id=customer_id,
        device_id=device_id,
        user_id=user_id,
        occurred_at=occurred_at.isoformat(),
    )
    event = decode_document(doc)
    assert isinstance(event, Heartbeat)
    assert (event.event_id, event.customer_id, event.device_id) == (
        event_id,
        customer_id,
        device_id,
    )
    assert event.user_id == user_id
    assert event.occurred_at == occurred_at


# --- administrative events ------------------------------------------------------------------


ADMIN_BASE = {
    "schema_version": 1,
    "event_id": "adm-1",
    "customer_id": "cust-1",
    "occurred_at": "2026-11-28T10:00:00Z",
}


@pytest.mark.parametrize(
    "fields",
    [
        {"type": "customer.created", "name": "Contoso", "license_model": "device"},
        {"type": "customer.updated"},
        {"type": "customer.inactivated"},
        {"type": "customer.reactivated"},
        {
            "type": "subscription.attached",
            "subscription_id": "s1",
            "package": "core_plus",
            "group_id": "admins",
            "status": "in_trial",
            "trial_ends_at": "2026-12-28T00:00:00Z",
            "seats": 25,
        },
        {"type": "subscription.status_changed", "subscription_id": "s1", "status": "cancelled"},
        {"type": "group.member_added", "group_id": "admins", "user_id": "ann"},
        {"type": "group.member_removed", "group_id": "admins", "user_id": "ann"},
    ],
)
def test_admin_events_of_every_type_decode(fields: dict[str, object]) -> None:
    decoded = decode_admin_event(orjson.dumps({**ADMIN_BASE, **fields, "extra": 1}), 65_536)
    assert not isinstance(decoded, Rejection), decoded
    assert decoded.type == fields["type"]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"type": "customer.deleted"}, RejectReason.UNKNOWN_TYPE),
        (
            {
                "type": "subscription.attached",
                "subscription_id": "s1",
                "package": "core",
                "status": "in_trial",  # a trial without an end
            },
            RejectReason.SCHEMA_VIOLATION,
        ),
        (
            {
                "type": "subscription.attached",
                "subscription_id": "s1",
                "package": "enterprise",
                "status": "active",
            },
            RejectReason.SCHEMA_VIOLATION,
        ),
        (
            {
                "type": "subscription.attached",
                "subscription_id": "s1",
                "package": "core",
                "status": "cancelled",
            },  # attach as cancelled makes no sense
            RejectReason.SCHEMA_VIOLATION,
        ),
        ({"type": "group.member_added", "group_id": "g"}, RejectReason.SCHEMA_VIOLATION),
        ({"type": "customer.created", "license_model": "seat"}, RejectReason.SCHEMA_VIOLATION),
        (
            {"type": "customer.created", "occurred_at": "2026-11-28T10:00:00"},  # naive
            RejectReason.SCHEMA_VIOLATION,
        ),
    ],
)
def test_bad_admin_events_are_rejected_with_a_reason(
    fields: dict[str, object], reason: RejectReason
) -> None:
    decoded = decode_admin_event(orjson.dumps({**ADMIN_BASE, **fields}), 65_536)
    assert isinstance(decoded, Rejection)
    assert decoded.reason is reason
    assert "ann" not in decoded.detail


def test_unknown_admin_type_names_the_admin_types() -> None:
    decoded = decode_admin_event(orjson.dumps({**ADMIN_BASE, "type": "heartbeat"}), 65_536)
    assert isinstance(decoded, Rejection)
    assert "subscription.attached" in decoded.detail


def test_the_simulated_console_sends_valid_admin_events() -> None:
    events = console_events(3, AT)
    decoded = [decode_admin_event(orjson.dumps(event), MAX_BYTES) for event in events]
    assert not [d for d in decoded if isinstance(d, Rejection)]
    assert [d.type for d in decoded].count("subscription.attached") == 4
    assert len({d.event_id for d in decoded}) == len(decoded)

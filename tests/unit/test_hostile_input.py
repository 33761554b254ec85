"""Hostile input at the decoder: every message is an event the worker can store, or a
rejection with a reason. Never an exception, never a value Postgres or Python would refuse
later (that would be a crash or a `database_rejected` instead of a schema violation)."""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.agent_events import EARLIEST_EVENT_TIME, LATEST_EVENT_TIME, MAX_ID_LENGTH
from worker.ingest.coalesce import coalesce
from worker.ingest.decoding import MAX_DETAIL_LENGTH, Rejection, RejectReason, decode_agent_event

MAX_BYTES = 4096
NOW = datetime(2026, 11, 28, 17, 0, tzinfo=UTC)
TOLERANCE = timedelta(minutes=5)
ID_FIELDS = ["event_id", "customer_id", "device_id", "user_id"]
TEXT_FIELDS = ["agent_version", "hostname", "os"]
PROFILE_FIELDS = ["email", "display_name"]


def install(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "schema_version": 1,
        "event_id": "evt-1",
        "type": "install",
        "customer_id": "cust-1",
        "device_id": "dev-1",
        "user_id": "alice@contoso.example",
        "occurred_at": "2026-11-28T17:00:00Z",
        "agent_version": "5.3.1",
        "device_kind": "business",
        "hostname": "alice-laptop",
        "os": "windows-11",
        "user": {"email": "alice@contoso.example", "display_name": "Alice"},
    }
    document.update(changes)
    return document


def decode(document: object, max_bytes: int = MAX_BYTES) -> object:
    return decode_agent_event(orjson.dumps(document), max_bytes)


def reason_of(result: object) -> RejectReason:
    assert isinstance(result, Rejection), f"expected a rejection, got {result!r}"
    assert len(result.detail) <= MAX_DETAIL_LENGTH
    return result.reason


def strings_of(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for key, item in value.items() for s in strings_of(key) + strings_of(item)]
    if isinstance(value, list):
        return [s for item in value for s in strings_of(item)]
    return []


def assert_storable(result: object) -> None:
    """An accepted event goes through the batch fold (Python datetimes in UTC) and into
    Postgres text and timestamptz columns without an error."""
    if isinstance(result, Rejection):
        assert result.reason is not RejectReason.DATABASE_REJECTED
        assert len(result.detail) <= MAX_DETAIL_LENGTH
        return
    changes = coalesce([result], NOW, TOLERANCE)  # type: ignore[list-item]
    for text in strings_of(result.model_dump(mode="json")):  # type: ignore[attr-defined]
        assert "\x00" not in text, "Postgres text cannot hold NUL"
    for device in changes.devices.values():
        assert device.last_seen_at.tzinfo is UTC
        assert EARLIEST_EVENT_TIME <= device.first_seen_at <= device.last_seen_at
        assert device.last_seen_at <= NOW + TOLERANCE


# --- size and structure ----------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    prefix=st.sampled_from([b"[", b'{"a":', b"\xff", b"\x00", b'{"schema_version": 1, "x": "']),
    extra=st.integers(min_value=1, max_value=3 * MAX_BYTES),
)
def test_anything_over_the_limit_is_oversized_whatever_it_holds(prefix: bytes, extra: int) -> None:
    value = (prefix * (MAX_BYTES // len(prefix) + extra))[: MAX_BYTES + extra]
    assert reason_of(decode_agent_event(value, MAX_BYTES)) is RejectReason.OVERSIZED


@pytest.mark.parametrize("depth", [1024, 5000, 100_000])
def test_nesting_deeper_than_the_parser_allows_is_invalid_json_not_a_crash(depth: int) -> None:
    value = b'{"schema_version": 1, "x": ' + b"[" * depth + b"]" * depth + b"}"
    assert reason_of(decode_agent_event(value, len(value))) is RejectReason.INVALID_JSON


def test_nesting_the_parser_allows_is_judged_by_the_schema() -> None:
    nested: Any = "alice@contoso.example"
    for _ in range(200):  # as deep as orjson writes; the parser reads up to 1024
        nested = {"x": nested}
    assert reason_of(decode(install(user_id=nested), 1 << 20)) is RejectReason.SCHEMA_VIOLATION


def test_a_huge_string_within_the_limit_is_a_schema_violation() -> None:
    result = decode(install(device_id="d" * 60_000), 65_536)
    assert reason_of(result) is RejectReason.SCHEMA_VIOLATION
    assert "d" * 100 not in result.detail  # type: ignore[attr-defined]


# --- Unicode tricks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "escaped",
    [b"\\ud800", b"a\\udc00b", b"\\udbff", b"a\\ud800\\u0041"],
    ids=["high", "low", "high-last", "high-then-letter"],
)
@pytest.mark.parametrize("field", [*ID_FIELDS, "hostname"])
def test_a_lone_surrogate_escape_is_invalid_json(escaped: bytes, field: str) -> None:
    value = orjson.dumps(install(**{field: "PLACEHOLDER"})).replace(b"PLACEHOLDER", escaped)
    assert reason_of(decode_agent_event(value, MAX_BYTES)) is RejectReason.INVALID_JSON


INVISIBLE_OR_CONTROL = {
    "nul": "\x00",
    "bell": "\x07",
    "escape": "\x1b",
    "delete": "\x7f",
    "next-line": "\x85",
    "rtl-override": "\u202e",
    "ltr-embedding": "\u202a",
    "rtl-isolate": "\u2067",
    "zero-width-space": "\u200b",
    "zero-width-joiner": "\u200d",
    "byte-order-mark": "\ufeff",
    "soft-hyphen": "\u00ad",
    "line-separator": "\u2028",
    "paragraph-separator": "\u2029",
    "tag-character": "\U000e0041",
}


@pytest.mark.parametrize("field", ID_FIELDS)
@pytest.mark.parametrize("character", INVISIBLE_OR_CONTROL.values(), ids=list(INVISIBLE_OR_CONTROL))
def test_ids_refuse_controls_and_invisible_format_characters(field: str, character: str) -> None:
    for identifier in (f"{character}dev", f"dev{character}", f"de{character}v"):
        assert reason_of(decode(install(**{field: identifier}))) is RejectReason.SCHEMA_VIOLATION


@pytest.mark.parametrize("field", [*TEXT_FIELDS, "user.email", "user.display_name"])
def test_free_text_refuses_nul_but_keeps_other_characters(field: str) -> None:
    def with_value(text: str) -> dict[str, Any]:
        if field.startswith("user."):
            return install(user={field.removeprefix("user."): text})
        return install(**{field: text})

    assert reason_of(decode(with_value("a\x00b"))) is RejectReason.SCHEMA_VIOLATION
    kept = "Ali\u202ece\u200b\tline\nbreak"
    event = decode(with_value(kept))
    assert not isinstance(event, Rejection)
    assert kept in strings_of(event.model_dump(mode="json"))  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("identifier", "lookalike"),
    [
        ("\u0430cme", "acme"),  # Cyrillic a
        ("\u0391CME", "ACME"),  # Greek capital alpha
        ("e\u0301", "\u00e9"),  # decomposed and composed e-acute (NFD, NFC)
        ("\ufb01le", "file"),  # ligature fi (NFKC folds it)
        ("\uff41cme", "acme"),  # full-width a
    ],
    ids=["cyrillic", "greek", "nfd-nfc", "ligature", "full-width"],
)
def test_lookalike_ids_are_kept_exactly_and_stay_distinct(identifier: str, lookalike: str) -> None:
    """Ids are compared code point by code point and never normalized: normalizing would let
    one tenant's id collide with another's; a look-alike is simply a different id."""
    events = [
        decode(install(customer_id=i, device_id=i, user_id=i)) for i in (identifier, lookalike)
    ]
    assert [(e.customer_id, e.device_id, e.user_id) for e in events] == [  # type: ignore[attr-defined]
        (identifier, identifier, identifier),
        (lookalike, lookalike, lookalike),
    ]
    assert unicodedata.normalize("NFKC", identifier) != identifier or identifier != lookalike


@pytest.mark.parametrize(
    "identifier",
    [
        "'; DROP TABLE devices; --",
        "x' OR '1'='1",
        "dev\\'); DELETE FROM licenses; --",
        "$1",
        "%s",
        "{customer_id}",
        "acme:dev-1",
        "acme|license.allocated|user",
        "../../etc/passwd",
        "<script>alert(1)</script>",
    ],
)
@pytest.mark.parametrize("field", ID_FIELDS)
def test_sql_and_separator_looking_ids_are_plain_ids(field: str, identifier: str) -> None:
    event = decode(install(**{field: identifier}))
    assert not isinstance(event, Rejection)
    assert getattr(event, field) == identifier


@pytest.mark.parametrize("field", ["event_id", "customer_id", "device_id"])
def test_ids_at_and_over_the_length_limit(field: str) -> None:
    assert not isinstance(decode(install(**{field: "é" * MAX_ID_LENGTH})), Rejection)
    over = decode(install(**{field: "é" * (MAX_ID_LENGTH + 1)}))
    assert reason_of(over) is RejectReason.SCHEMA_VIOLATION


# --- wrong types ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [42, 4.2, True, False, [], ["dev-1"], {"id": "dev-1"}])
@pytest.mark.parametrize("field", [*ID_FIELDS, "hostname", "os", "device_kind", "type"])
def test_a_non_string_where_a_string_belongs_is_refused(field: str, value: object) -> None:
    reason = reason_of(decode(install(**{field: value})))
    expected = RejectReason.UNKNOWN_TYPE if field == "type" else RejectReason.SCHEMA_VIOLATION
    assert reason is expected


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        (True, RejectReason.UNSUPPORTED_SCHEMA_VERSION),
        (False, RejectReason.UNSUPPORTED_SCHEMA_VERSION),
        (1.5, RejectReason.UNSUPPORTED_SCHEMA_VERSION),
        ("1", RejectReason.UNSUPPORTED_SCHEMA_VERSION),
        ([1], RejectReason.UNSUPPORTED_SCHEMA_VERSION),
        (None, RejectReason.UNSUPPORTED_SCHEMA_VERSION),
        (2, RejectReason.UNSUPPORTED_SCHEMA_VERSION),
    ],
)
def test_schema_version_must_be_the_number_one(version: object, expected: RejectReason) -> None:
    assert reason_of(decode(install(schema_version=version))) is expected
    assert reason_of(decode(install(schema_version=version, type="reboot"))) is expected


@pytest.mark.parametrize("number", [b"99999999999999999999999", b"-1e400", b"1e308", b"-0"])
def test_numbers_beyond_64_bits_are_refused_not_raised(number: bytes) -> None:
    value = orjson.dumps(install(schema_version=7)).replace(
        b'"schema_version":7', b'"schema_version":' + number
    )
    assert isinstance(decode_agent_event(value, MAX_BYTES), Rejection)


def test_schema_version_one_point_zero_is_the_number_one() -> None:
    # JSON has one number type: the exported JSON Schema (`const: 1`) accepts 1.0 too.
    assert not isinstance(decode(install(schema_version=1.0)), Rejection)


@pytest.mark.parametrize(
    "occurred_at",
    [
        1_764_349_200,  # Unix seconds
        1_764_349_200_000,  # Unix milliseconds
        1.7643492e9,
        "1764349200",
        True,
        None,
        ["2026-11-28T17:00:00Z"],
        "2026-11-28T17:00:00",  # naive
        "2026-11-28",  # a date
        "28/11/2026 17:00",
        "",
        "1969-12-31T23:59:59Z",  # before the epoch: a reset agent clock
        "0001-01-01T00:00:00+14:00",  # year 0 in UTC: Python cannot convert it
        "1601-01-01T00:00:00Z",  # Windows' epoch
        "9999-12-31T23:59:59-14:00",  # year 10000 in UTC
        "2026-02-30T00:00:00Z",
        "2026-11-28T25:00:00Z",
        "2026-11-28T17:00:00+24:00",
    ],
)
def test_occurred_at_must_be_an_rfc3339_time_from_1970_on(occurred_at: object) -> None:
    assert reason_of(decode(install(occurred_at=occurred_at))) is RejectReason.SCHEMA_VIOLATION


@pytest.mark.parametrize(
    "occurred_at",
    ["1970-01-01T00:00:00Z", "1970-01-01T14:00:00+14:00", "9999-12-29T23:59:59Z"],
)
def test_extreme_times_inside_the_bounds_are_accepted_and_storable(occurred_at: str) -> None:
    event = decode(install(occurred_at=occurred_at))
    assert not isinstance(event, Rejection)
    assert_storable(event)


# --- properties -------------------------------------------------------------------------------

any_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)
hostile_text = st.one_of(
    any_text,
    st.sampled_from([*INVISIBLE_OR_CONTROL.values(), "'; DROP TABLE users; --", "é", "ﬁ"]).map(
        lambda trick: f"dev{trick}1"
    ),
    st.text(alphabet="\x00\u202e\u200bab ", max_size=6),
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what orjson writes
    | st.floats(allow_nan=False, allow_infinity=False)
    | hostile_text
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(any_text, children, max_size=3)
    ),
    max_leaves=8,
)
any_offset = st.integers(min_value=-14 * 60, max_value=14 * 60).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
any_time = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=any_offset
).map(lambda at: at.isoformat())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    changes=st.dictionaries(
        st.sampled_from(
            [*ID_FIELDS, *TEXT_FIELDS, "type", "device_kind", "user", "schema_version"]
        ),
        json_values,
        max_size=3,
    ),
    occurred_at=any_time | json_values,
)
def test_any_mutation_of_a_valid_install_is_storable_or_rejected(
    changes: dict[str, Any], occurred_at: object
) -> None:
    assert_storable(decode(install(occurred_at=occurred_at, **changes)))


@settings(max_examples=300, deadline=None)
@given(occurred_at=any_time)
def test_every_accepted_event_time_survives_the_fold(occurred_at: str) -> None:
    result = decode(install(occurred_at=occurred_at))
    parsed = datetime.fromisoformat(occurred_at)
    if EARLIEST_EVENT_TIME <= parsed <= LATEST_EVENT_TIME:
        assert not isinstance(result, Rejection)
    else:
        assert reason_of(result) is RejectReason.SCHEMA_VIOLATION
    assert_storable(result)


@settings(max_examples=300, deadline=None)
@given(
    profile=st.dictionaries(st.sampled_from(PROFILE_FIELDS), json_values, max_size=2),
    value=st.binary(max_size=64),
)
def test_profile_and_raw_bytes_never_raise(profile: dict[str, Any], value: bytes) -> None:
    assert_storable(decode(install(user=profile)))
    spliced = orjson.dumps(install()).replace(b"alice-laptop", value)
    assert_storable(decode_agent_event(spliced, MAX_BYTES))

"""Gateway and console signatures (worker/trust/signing.py): the reference signer, the
verification the worker runs on every agent message, key rotation, the keys file."""

from __future__ import annotations

import base64
import hmac
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas import Heartbeat
from worker.ingest.batch import decode_batch, decode_signed_agent_event
from worker.ingest.decoding import Rejection, RejectReason
from worker.settings import Settings
from worker.sim.fleet import SimulatedDevice, agent_event, encode
from worker.trust.signing import (
    HMAC_HEADER,
    KEY_ID_HEADER,
    SigningKeys,
    SigningKeysError,
    agent_signed_bytes,
    canonical_time,
    console_signed_bytes,
    load_signing_keys,
    parse_signing_keys,
    sign,
    signature_in,
    unauthenticated_reason,
)

MAX_BYTES = 65_536
AT = datetime(2026, 11, 28, 17, 0, tzinfo=UTC)
DEVICE = SimulatedDevice("cust-042", "dev-7f3a", "alice@contoso.example", "business")
CURRENT, PREVIOUS = b"c" * 32, b"p" * 32
KEYS = SigningKeys({"2026-12": CURRENT, "2026-06": PREVIOUS}, current="2026-12")


@dataclass(frozen=True)
class FakeRecord:
    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = field(default=())


def record(value: bytes | None, headers: list[tuple[str, bytes]] | None) -> FakeRecord:
    return FakeRecord("agent.heartbeat.v1", 0, 7, 0, DEVICE.key, value, tuple(headers or ()))


def signed_heartbeat(
    keys: SigningKeys = KEYS, key_id: str | None = None, **changes: object
) -> FakeRecord:
    """A heartbeat signed by the gateway, then (with `changes`) altered on the way."""
    event = agent_event(DEVICE, "heartbeat", AT)
    headers = sign(keys, signed_fields(event), key_id)
    return record(encode({**event, **changes}), headers)


def signed_fields(event: dict[str, object]) -> bytes:
    occurred_at = datetime.fromisoformat(str(event["occurred_at"]))
    fields = [str(event[name]) for name in ("customer_id", "device_id", "event_id", "type")]
    return agent_signed_bytes(*fields, occurred_at)


def verdict(item: FakeRecord, keys: SigningKeys = KEYS) -> object:
    return decode_signed_agent_event(item, MAX_BYTES, keys)


def test_a_message_signed_with_the_current_key_is_accepted() -> None:
    assert isinstance(verdict(signed_heartbeat()), Heartbeat)


def test_the_previous_key_is_still_accepted_during_a_rotation() -> None:
    assert isinstance(verdict(signed_heartbeat(key_id="2026-06")), Heartbeat)


def test_a_key_removed_from_the_file_is_refused() -> None:
    retired = SigningKeys({"2026-12": CURRENT}, current="2026-12")
    rejection = verdict(signed_heartbeat(key_id="2026-06"), retired)
    assert rejection == Rejection(RejectReason.UNAUTHENTICATED, "signed with an unknown key id")


def test_an_unknown_key_id_is_refused() -> None:
    forger = SigningKeys({"forged": CURRENT}, current="forged")
    rejection = verdict(signed_heartbeat(forger))
    assert isinstance(rejection, Rejection)
    assert rejection.reason is RejectReason.UNAUTHENTICATED


def test_a_known_key_id_with_another_key_is_refused() -> None:
    forger = SigningKeys({"2026-12": b"f" * 32}, current="2026-12")
    rejection = verdict(signed_heartbeat(forger))
    assert rejection == Rejection(RejectReason.UNAUTHENTICATED, "signature does not match")


@pytest.mark.parametrize(
    "changes",
    [
        {"customer_id": "cust-043"},  # the tenant: the point of the signature
        {"device_id": "dev-7f3b"},
        {"event_id": "8f0c6a1e-3b9e-4e55-9a53-1b4f4cbd2a11"},
        {"type": "uninstall"},  # a captured heartbeat replayed as an uninstall
        {"occurred_at": (AT + timedelta(seconds=1)).isoformat()},
        {"occurred_at": (AT + timedelta(microseconds=1)).isoformat()},
    ],
)
def test_a_tampered_signed_field_is_refused(changes: dict[str, object]) -> None:
    rejection = verdict(signed_heartbeat(**changes))
    assert rejection == Rejection(RejectReason.UNAUTHENTICATED, "signature does not match")


def test_the_same_instant_in_another_offset_is_the_same_signed_time() -> None:
    """The worker reads event times as instants: the signature covers the instant in UTC."""
    plus_one = AT.astimezone(timezone(timedelta(hours=1))).isoformat()
    assert isinstance(verdict(signed_heartbeat(occurred_at=plus_one)), Heartbeat)
    assert canonical_time(AT) == "1795885200000000"
    assert canonical_time(AT + timedelta(microseconds=1)) == "1795885200000001"


def test_fields_outside_the_signature_may_differ() -> None:
    """Documented: the agent signature binds tenant, device, event, type and time only."""
    assert isinstance(verdict(signed_heartbeat(agent_version="9.9.9")), Heartbeat)


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ([], "no valid sig.key_id and sig.hmac headers"),
        ([(KEY_ID_HEADER, b"2026-12")], "no valid sig.key_id and sig.hmac headers"),
        ([(HMAC_HEADER, b"0" * 64)], "no valid sig.key_id and sig.hmac headers"),
        ([(KEY_ID_HEADER, b"2026-12"), (HMAC_HEADER, b"0" * 63)], "no valid"),
        ([(KEY_ID_HEADER, b"2026-12"), (HMAC_HEADER, b"A" * 64)], "signature does not match"),
        ([(KEY_ID_HEADER, b"2026-12"), (HMAC_HEADER, b"\xff" * 64)], "signature does not"),
        ([(KEY_ID_HEADER, b"\xff"), (HMAC_HEADER, b"0" * 64)], "no valid"),
        ([(KEY_ID_HEADER, b"2026-12"), (HMAC_HEADER, b"0" * 64)], "signature does not match"),
    ],
)
def test_unsigned_or_malformed_signatures_are_refused(
    headers: list[tuple[str, bytes]], why: str
) -> None:
    rejection = verdict(record(encode(agent_event(DEVICE, "heartbeat", AT)), headers))
    assert isinstance(rejection, Rejection)
    assert rejection.reason is RejectReason.UNAUTHENTICATED
    assert rejection.detail.startswith(why)


def test_two_signatures_are_refused_even_if_one_is_valid() -> None:
    valid = signed_heartbeat()
    doubled = record(valid.value, [*valid.headers, (HMAC_HEADER, b"0" * 64)])
    assert signature_in(doubled.headers) is None
    assert verdict(doubled) == Rejection(
        RejectReason.UNAUTHENTICATED, "no valid sig.key_id and sig.hmac headers"
    )


def test_an_unsigned_message_is_refused_before_it_is_parsed() -> None:
    rejection = verdict(record(b"{not json", None))
    assert isinstance(rejection, Rejection)
    assert rejection.reason is RejectReason.UNAUTHENTICATED


def test_a_signed_message_that_cannot_be_decoded_keeps_its_decoding_reason() -> None:
    headers = sign(KEYS, b"anything")
    rejection = verdict(record(b"{not json", headers))
    assert isinstance(rejection, Rejection)
    assert rejection.reason is RejectReason.INVALID_JSON


def test_decode_batch_dead_letters_unsigned_messages_only_when_keys_are_given() -> None:
    unsigned = record(encode(agent_event(DEVICE, "heartbeat", AT)), None)
    signed = FakeRecord(**{**signed_heartbeat().__dict__, "offset": 8})
    batch = decode_batch({("agent.heartbeat.v1", 0): [unsigned, signed]}, MAX_BYTES, KEYS)
    assert [item.record.offset for item in batch.good] == [8]
    [letter] = batch.dead_letters
    assert letter.rejection.reason is RejectReason.UNAUTHENTICATED
    assert (letter.value, letter.headers) == (unsigned.value, [])
    assert batch.next_offsets == {("agent.heartbeat.v1", 0): 9}
    assert len(decode_batch({("agent.heartbeat.v1", 0): [unsigned]}, MAX_BYTES).good) == 1


identifiers = st.text(min_size=1, max_size=20)


@given(identifiers, identifiers, identifiers, identifiers, identifiers, identifiers)
def test_the_signed_bytes_never_coincide_for_different_fields(
    a: str, b: str, c: str, d: str, e: str, f: str
) -> None:
    """Length-prefixed fields: moving text from one field into its neighbour changes the
    bytes (a customer `acme` + device `x:y` is not customer `acme:x` + device `y`)."""
    first = agent_signed_bytes(a, b, c, "heartbeat", AT)
    second = agent_signed_bytes(d, e, f, "heartbeat", AT)
    assert (first == second) == ((a, b, c) == (d, e, f))


@given(st.binary(min_size=32, max_size=200), st.binary(max_size=300))
def test_the_precomputed_hmac_is_hmac_sha256(key: bytes, message: bytes) -> None:
    keys = SigningKeys({"k": key}, current="k")
    assert keys.hex_digest("k", message) == hmac.new(key, message, "sha256").hexdigest().encode()
    assert sign(keys, message)[1] == (HMAC_HEADER, keys.hex_digest("k", message))


def test_console_signature_covers_the_whole_value() -> None:
    value = orjson.dumps({"type": "customer.created", "customer_id": "acme"})
    headers = sign(KEYS, console_signed_bytes(value))
    signature = signature_in(headers)
    assert unauthenticated_reason(KEYS, signature, console_signed_bytes(value)) is None
    tampered = value.replace(b"acme", b"acmf")
    assert unauthenticated_reason(KEYS, signature, console_signed_bytes(tampered)) is not None
    # An agent's signature over the same bytes is not a console signature (domain tags).
    assert console_signed_bytes(value) != agent_signed_bytes("", "", "", "", AT)


def test_header_values_are_ascii() -> None:
    for _, value in sign(KEYS, b"x"):
        value.decode("ascii")


def keys_file(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "keys.json"
    path.write_bytes(orjson.dumps(document))
    return path


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def test_the_keys_file_round_trip(tmp_path: Path) -> None:
    key = os.urandom(32)
    path = keys_file(tmp_path, {"current": "k2", "keys": {"k2": b64(key), "k1": b64(PREVIOUS)}})
    keys = load_signing_keys(path, "AGENT_SIGNING_KEYS_FILE")
    assert keys.keys == {"k2": key, "k1": PREVIOUS}
    assert keys.current == "k2"
    assert b64(key) not in repr(keys)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"keys": {"k1": b64(b"s" * 31)}}, "shorter than 32 bytes"),
        ({"keys": {"k1": "not base64!"}}, "is not base64"),
        ({"keys": {"k1": 12}}, "shorter than 32 bytes"),
        ({"keys": {"bad id": b64(CURRENT)}}, "key ids are"),
        ({"keys": {"k\u00e9": b64(CURRENT)}}, "key ids are"),
        ({"keys": {}}, "no keys"),
        ({"current": "k2", "keys": {"k1": b64(CURRENT)}}, "is not among the keys"),
        ([b64(CURRENT)], "expected"),
    ],
)
def test_unusable_keys_files_are_refused(document: object, message: str) -> None:
    with pytest.raises(SigningKeysError, match=message):
        parse_signing_keys(document, "AGENT_SIGNING_KEYS_FILE")


def test_signing_needs_a_current_key() -> None:
    with pytest.raises(SigningKeysError):
        sign(SigningKeys({"k1": CURRENT}), b"x")


def test_settings_refuse_an_unusable_keys_file_at_start(tmp_path: Path) -> None:
    path = keys_file(tmp_path, {"keys": {"k1": b64(b"short")}})
    with pytest.raises(ValidationError, match="CONSOLE_SIGNING_KEYS_FILE"):
        Settings(console_signing_keys_file=path)
    with pytest.raises(ValidationError, match="AGENT_SIGNING_KEYS_FILE: cannot read"):
        Settings(agent_signing_keys_file=tmp_path / "missing.json")


def test_an_empty_keys_file_variable_means_no_signatures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_SIGNING_KEYS_FILE", "")
    monkeypatch.setenv("CONSOLE_SIGNING_KEYS_FILE", "")
    settings = Settings()
    assert settings.agent_signing_keys() is None
    assert settings.console_signing_keys() is None


def test_settings_default_to_refusing_unknown_customers_without_signatures() -> None:
    settings = Settings()
    assert settings.unknown_customers == "refuse"
    assert settings.agent_signing_keys() is None
    assert settings.console_signing_keys() is None
    with pytest.raises(ValidationError):
        Settings(unknown_customers="create")  # type: ignore[arg-type]

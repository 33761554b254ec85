"""Signatures of the license events the relay publishes (worker/trust/license_events.py):
what the relay signs, billing's verification, rotation, and the separation from the
gateway's and the console's signatures."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable
from pathlib import Path
from typing import cast

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from worker.settings import Settings
from worker.trust.license_events import (
    LICENSE_EVENT_DOMAIN,
    LicenseEventVerdict,
    license_event_headers,
    license_event_signed_bytes,
    license_event_verdict,
    verify_license_event,
)
from worker.trust.signing import (
    AGENT_DOMAIN,
    CONSOLE_DOMAIN,
    HMAC_HEADER,
    KEY_ID_HEADER,
    SigningKeys,
    SigningKeysError,
    console_signed_bytes,
    sign,
)

CURRENT, PREVIOUS = b"c" * 32, b"p" * 32
KEYS = SigningKeys({"2026-12": CURRENT, "2026-06": PREVIOUS}, current="2026-12")
KEY = b"acme"
VALUE = orjson.dumps(
    {
        "schema_version": 1,
        "event_id": "0b6f5a52-3c0e-8d5e-9a0b-4b1f0e0c1d2e",
        "type": "license.allocated",
        "customer_id": "acme",
        "subject_type": "user",
        "subject_id": "alice@acme.example",
        "sequence": 1,
    }
)
EVENT_ID_HEADER = ("event_id", b"0b6f5a52-3c0e-8d5e-9a0b-4b1f0e0c1d2e")


def signed(
    keys: SigningKeys = KEYS, key: bytes = KEY, value: bytes = VALUE
) -> list[tuple[str, bytes]]:
    return [EVENT_ID_HEADER, *license_event_headers(keys, key, value)]


def verdict(
    headers: list[tuple[str, bytes]], key: bytes | None = KEY, value: bytes | None = VALUE
) -> LicenseEventVerdict:
    return license_event_verdict(KEYS, key, value, headers)


def test_an_event_signed_by_the_relay_verifies() -> None:
    headers = signed()
    assert verdict(headers) is LicenseEventVerdict.VALID
    assert verify_license_event(KEYS, KEY, VALUE, headers)


def test_the_current_key_signs_and_names_itself() -> None:
    headers = dict(signed())
    assert headers[KEY_ID_HEADER] == b"2026-12"
    expected = hmac.new(CURRENT, license_event_signed_bytes(KEY, VALUE), hashlib.sha256)
    assert headers[HMAC_HEADER] == expected.hexdigest().encode("ascii")


def test_signing_the_same_bytes_again_gives_the_same_headers() -> None:
    """A relay that re-publishes after a crash sends the same signature."""
    assert signed() == signed()


def test_the_signed_bytes_are_the_domain_tag_the_key_and_the_value_length_prefixed() -> None:
    assert LICENSE_EVENT_DOMAIN == b"license-telemetry/license-event/v1"
    assert license_event_signed_bytes(b"acme", b"{}") == (
        b"\x00\x00\x00\x22license-telemetry/license-event/v1\x00\x00\x00\x04acme\x00\x00\x00\x02{}"
    )


def test_a_tampered_value_is_refused() -> None:
    headers = signed()
    tampered = VALUE.replace(b"license.allocated", b"license.released")
    assert verdict(headers, value=tampered) is LicenseEventVerdict.BAD_SIGNATURE
    assert not verify_license_event(KEYS, KEY, tampered, headers)


def test_a_value_changed_only_in_whitespace_is_refused() -> None:
    """The whole bytes are signed, not their JSON meaning."""
    assert verdict(signed(), value=VALUE + b" ") is LicenseEventVerdict.BAD_SIGNATURE


def test_a_tampered_message_key_is_refused() -> None:
    assert verdict(signed(), key=b"globex") is LicenseEventVerdict.BAD_SIGNATURE


def test_bytes_moved_between_key_and_value_are_refused() -> None:
    headers = signed(key=b"acme", value=b"x{}")
    assert license_event_verdict(KEYS, b"acmex", b"{}", headers) is (
        LicenseEventVerdict.BAD_SIGNATURE
    )


def test_a_record_without_key_or_value_is_malformed() -> None:
    headers = signed()
    assert verdict(headers, key=None) is LicenseEventVerdict.MALFORMED
    assert verdict(headers, value=None) is LicenseEventVerdict.MALFORMED


@pytest.mark.parametrize(
    "domain_signed",
    [
        # The gateway's or the console's signature over the very same bytes never passes.
        lambda key, value: (
            len(AGENT_DOMAIN).to_bytes(4, "big")
            + AGENT_DOMAIN
            + len(key).to_bytes(4, "big")
            + key
            + len(value).to_bytes(4, "big")
            + value
        ),
        lambda key, value: console_signed_bytes(value),
        lambda key, value: (
            len(key).to_bytes(4, "big") + key + len(value).to_bytes(4, "big") + value
        ),
        lambda key, value: value,
    ],
    ids=["agent-domain", "console-signature", "no-domain", "bare-value"],
)
def test_a_signature_of_another_domain_is_refused(
    domain_signed: Callable[[bytes, bytes], bytes],
) -> None:
    headers = sign(KEYS, domain_signed(KEY, VALUE))
    assert verdict(headers) is LicenseEventVerdict.BAD_SIGNATURE


def test_a_license_event_signature_is_not_a_console_signature() -> None:
    headers = signed()
    [digest] = [value for name, value in headers if name == HMAC_HEADER]
    console = hmac.new(CURRENT, console_signed_bytes(VALUE), hashlib.sha256).hexdigest()
    assert digest != console.encode("ascii")
    assert CONSOLE_DOMAIN != LICENSE_EVENT_DOMAIN != AGENT_DOMAIN


def test_an_event_signed_with_the_previous_key_verifies_during_a_rotation() -> None:
    before = SigningKeys({"2026-06": PREVIOUS}, current="2026-06")
    assert verdict(signed(before)) is LicenseEventVerdict.VALID


def test_a_key_removed_after_the_rotation_makes_its_events_unknown() -> None:
    after = SigningKeys({"2026-12": CURRENT}, current="2026-12")
    old = signed(SigningKeys({"2026-06": PREVIOUS}, current="2026-06"))
    assert license_event_verdict(after, KEY, VALUE, old) is LicenseEventVerdict.UNKNOWN_KEY


def test_an_unknown_key_id_is_reported_as_such() -> None:
    forger = SigningKeys({"forger": b"f" * 32}, current="forger")
    assert verdict(signed(forger)) is LicenseEventVerdict.UNKNOWN_KEY


def test_a_known_key_id_with_another_key_is_a_bad_signature() -> None:
    impostor = SigningKeys({"2026-12": b"i" * 32}, current="2026-12")
    assert verdict(signed(impostor)) is LicenseEventVerdict.BAD_SIGNATURE


def test_an_event_without_signature_headers_is_unsigned() -> None:
    assert verdict([EVENT_ID_HEADER]) is LicenseEventVerdict.UNSIGNED
    assert verdict([]) is LicenseEventVerdict.UNSIGNED
    assert license_event_verdict(KEYS, KEY, VALUE, None) is LicenseEventVerdict.UNSIGNED


@pytest.mark.parametrize(
    "headers",
    [
        # Doubled: one valid signature next to another never counts.
        [*signed(), (HMAC_HEADER, b"0" * 64)],
        [*signed(), (KEY_ID_HEADER, b"2026-06")],
        [*signed(), *signed()],
        # Half a signature, a short or non-ASCII one.
        [(KEY_ID_HEADER, b"2026-12")],
        [(HMAC_HEADER, dict(signed())[HMAC_HEADER])],
        [(KEY_ID_HEADER, b"2026-12"), (HMAC_HEADER, b"abc")],
        [(KEY_ID_HEADER, b"\xff"), (HMAC_HEADER, dict(signed())[HMAC_HEADER])],
    ],
    ids=[
        "two-hmacs",
        "two-key-ids",
        "two-signatures",
        "no-hmac",
        "no-key-id",
        "short",
        "non-ascii",
    ],
)
def test_doubled_or_malformed_signature_headers_are_refused(
    headers: list[tuple[str, bytes]],
) -> None:
    assert verdict(headers) is LicenseEventVerdict.MALFORMED
    assert not verify_license_event(KEYS, KEY, VALUE, headers)


def test_an_uppercase_hex_digest_is_a_bad_signature() -> None:
    headers = [(name, value.upper() if name == HMAC_HEADER else value) for name, value in signed()]
    assert verdict(headers) is LicenseEventVerdict.BAD_SIGNATURE


@given(st.binary(max_size=40), st.binary(max_size=200), st.binary(max_size=40))
def test_any_other_key_or_value_fails(key: bytes, value: bytes, other: bytes) -> None:
    headers = license_event_headers(KEYS, key, value)
    assert license_event_verdict(KEYS, key, value, headers) is LicenseEventVerdict.VALID
    if other != key:
        assert not verify_license_event(KEYS, other, value, headers)
    if other != value:
        assert not verify_license_event(KEYS, key, other, headers)


# -- the setting -----------------------------------------------------------------------------


def keys_file(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "license-events.json"
    path.write_bytes(orjson.dumps(document))
    return path


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def test_the_setting_reads_the_keys_file(tmp_path: Path) -> None:
    path = keys_file(tmp_path, {"current": "k2", "keys": {"k2": b64(CURRENT), "k1": b64(PREVIOUS)}})
    keys = Settings(license_events_signing_key_file=path).license_events_signing_keys()
    assert keys is not None
    assert keys.current == "k2"
    assert keys.keys == {"k2": CURRENT, "k1": PREVIOUS}


def test_without_the_setting_there_are_no_signing_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().license_events_signing_keys() is None
    monkeypatch.setenv("LICENSE_EVENTS_SIGNING_KEY_FILE", "")
    assert Settings().license_events_signing_keys() is None


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"current": "k1", "keys": {"k1": b64(b"s" * 31)}}, "shorter than 32 bytes"),
        ({"current": "bad id", "keys": {"bad id": b64(CURRENT)}}, "key ids are"),
        ({"keys": {"k1": b64(CURRENT)}}, "`current`"),
        ({"current": "k2", "keys": {"k1": b64(CURRENT)}}, "is not among the keys"),
    ],
)
def test_an_unusable_keys_file_stops_start_up_with_the_variable_name(
    tmp_path: Path, document: object, message: str
) -> None:
    path = keys_file(tmp_path, document)
    with pytest.raises(ValidationError, match=f"LICENSE_EVENTS_SIGNING_KEY_FILE: .*{message}"):
        Settings(license_events_signing_key_file=path)


def test_a_missing_keys_file_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="LICENSE_EVENTS_SIGNING_KEY_FILE: cannot read"):
        Settings(license_events_signing_key_file=tmp_path / "missing.json")


def test_signing_without_a_current_key_is_refused() -> None:
    with pytest.raises(SigningKeysError):
        license_event_headers(SigningKeys({"k1": CURRENT}), KEY, VALUE)


# -- billing's side, as docs/licensing.md shows it ------------------------------------------

DOCS = Path(__file__).parents[2] / "docs" / "licensing.md"


def billing_example() -> dict[str, object]:
    """The Python example of docs/licensing.md, "For billing: verifying signatures", run."""
    text = DOCS.read_text(encoding="utf-8")
    section = text.split("### Verifying signatures", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 15
    imports = [line for line in code.splitlines() if "import " in line]
    assert imports == ["import hashlib, hmac"], "the standard library's hmac and hashlib only"
    namespace: dict[str, object] = {}
    exec(compile(code, str(DOCS), "exec"), namespace)  # our own documentation, run as written
    return namespace


def test_the_documented_billing_verifier_agrees_with_the_relay() -> None:
    verify = cast("Callable[..., bool]", billing_example()["verify"])
    keys = dict(KEYS.keys)
    headers = signed()
    assert verify(keys, KEY, VALUE, headers) is True
    assert verify(keys, KEY, VALUE + b" ", headers) is False
    assert verify(keys, b"globex", VALUE, headers) is False
    assert verify(keys, KEY, VALUE, [EVENT_ID_HEADER]) is False
    assert verify(keys, KEY, VALUE, [*headers, *headers]) is False
    assert verify({"2026-06": PREVIOUS}, KEY, VALUE, headers) is False
    agent = sign(KEYS, len(AGENT_DOMAIN).to_bytes(4, "big") + AGENT_DOMAIN + VALUE)
    assert verify(keys, KEY, VALUE, agent) is False

"""Signatures of the license events the service publishes, so billing can check that the
service emitted them (docs/licensing.md, "For billing", "Verifying signatures").

With LICENSE_EVENTS_SIGNING_KEY_FILE set, the relay signs every record it produces to the
license events topic with the file's `current` key; a verifier accepts every key in its
file (the current and the previous one while rotating).

Headers (ASCII), as for the gateway's and the console's messages: `sig.key_id` names the
key, `sig.hmac` is the lowercase hex HMAC-SHA256 of the signed bytes under that key.

Signed bytes: each of these as a 4-byte big-endian length followed by its bytes:
`license-telemetry/license-event/v1`, the record's key (the customer id, UTF-8, as sent),
the record's value (the JSON event, whole, byte for byte as sent). The domain tag differs
from the agents' and the console's, so a signature of one kind never passes as another.
Other headers (`event_id`) are not signed: the event id is inside the value.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from enum import StrEnum

from worker.trust.signing import HMAC_HEADER, KEY_ID_HEADER, SigningKeys, sign, signature_in

LICENSE_EVENT_DOMAIN = b"license-telemetry/license-event/v1"
_PREFIX = len(LICENSE_EVENT_DOMAIN).to_bytes(4, "big") + LICENSE_EVENT_DOMAIN
_SIGNATURE_HEADERS = frozenset({KEY_ID_HEADER, HMAC_HEADER})


class LicenseEventVerdict(StrEnum):
    VALID = "valid"
    # No `sig.*` header at all.
    UNSIGNED = "unsigned"
    # Signature headers, but not exactly one of each in the right form (doubled, half a
    # signature, a digest that is not 64 characters, a key id that is not ASCII), or a
    # record without key or value (the relay always sends both).
    MALFORMED = "malformed"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"


def license_event_signed_bytes(key: bytes, value: bytes) -> bytes:
    return _PREFIX + len(key).to_bytes(4, "big") + key + len(value).to_bytes(4, "big") + value


def license_event_headers(keys: SigningKeys, key: bytes, value: bytes) -> list[tuple[str, bytes]]:
    """The `sig.key_id` and `sig.hmac` headers of the record (key, value), signed with the
    current key: the same bytes always give the same headers (HMAC is deterministic)."""
    return sign(keys, license_event_signed_bytes(key, value))


def license_event_verdict(
    keys: SigningKeys,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]] | None,
) -> LicenseEventVerdict:
    """Whether the record (key, value, headers as read from Kafka) was signed with one of
    `keys` as a license event."""
    if not any(name in _SIGNATURE_HEADERS for name, _ in headers or ()):
        return LicenseEventVerdict.UNSIGNED
    signature = signature_in(headers)
    if signature is None or key is None or value is None:
        return LicenseEventVerdict.MALFORMED
    if signature.key_id not in keys.keys:
        return LicenseEventVerdict.UNKNOWN_KEY
    expected = keys.hex_digest(signature.key_id, license_event_signed_bytes(key, value))
    if not hmac.compare_digest(expected, signature.digest):
        return LicenseEventVerdict.BAD_SIGNATURE
    return LicenseEventVerdict.VALID


def verify_license_event(
    keys: SigningKeys,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]] | None,
) -> bool:
    """True only if the record carries a valid license-event signature by one of `keys`."""
    return license_event_verdict(keys, key, value, headers) is LicenseEventVerdict.VALID

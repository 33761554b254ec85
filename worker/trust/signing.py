"""Message signatures that bind agent and console messages to who sent them: the reference
signer for the agents' gateway and the console, and the worker's verification.

Kafka ACLs cover whole topics, not the `customer_id` inside a message, so the gateway that
authenticates each device signs what it forwards, and the worker refuses what it did not
sign (docs/security.md, "Gateway signatures").

Headers (ASCII): `sig.key_id` names the key, `sig.hmac` is the lowercase hex HMAC-SHA256
of the signed bytes under that key. Exactly one of each, or the message is unsigned.

Signed bytes: a domain tag then the fields, each as a 4-byte big-endian length followed by
its UTF-8 bytes (no separator a field could contain, so no two field lists share an
encoding):
- agent messages: `license-telemetry/agent/v1`, customer_id, device_id, event_id, type,
  occurred_at as the decimal count of microseconds since 1970-01-01T00:00:00Z (the instant,
  whatever offset the text had; digits beyond microseconds are dropped, as the worker reads
  them);
- console messages: `license-telemetry/console/v1`, then the message value, whole.

Keys file (JSON): `{"current": "2026-12", "keys": {"2026-12": "<base64>", "2026-06": "<base64>"}}`.
Key ids are 1-64 of `A-Z a-z 0-9 . _ -`; each key is at least 32 random bytes, base64.
The worker accepts every key listed (keep the current and the previous one while rotating);
a signer signs with `current`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

KEY_ID_HEADER = "sig.key_id"
HMAC_HEADER = "sig.hmac"
AGENT_DOMAIN = b"license-telemetry/agent/v1"
CONSOLE_DOMAIN = b"license-telemetry/console/v1"
MIN_KEY_BYTES = 32
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
HEX_DIGEST_LENGTH = 64
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)
_SHA256_BLOCK = 64


class SigningKeysError(ValueError):
    """A keys file that cannot be used; the message names the problem, never a key."""


@dataclass(frozen=True, slots=True)
class SigningKeys:
    keys: Mapping[str, bytes]
    current: str | None = None
    # Each key's HMAC state after its padded key block (RFC 2104), computed once: a copy per
    # message costs a third of `hmac.digest`, and verification runs on every heartbeat.
    _pads: dict[str, tuple[Any, Any]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pads = {key_id: _hmac_pads(key) for key_id, key in self.keys.items()}
        object.__setattr__(self, "_pads", pads)

    def __repr__(self) -> str:  # never print a key
        return f"SigningKeys(key_ids={sorted(self.keys)!r}, current={self.current!r})"

    def hex_digest(self, key_id: str, signed: bytes) -> bytes:
        """HMAC-SHA256 of `signed` under the key `key_id`, as lowercase hex (ASCII)."""
        inner_pad, outer_pad = self._pads[key_id]
        inner = inner_pad.copy()
        inner.update(signed)
        outer = outer_pad.copy()
        outer.update(inner.digest())
        return outer.hexdigest().encode("ascii")  # type: ignore[no-any-return]


def _hmac_pads(key: bytes) -> tuple[Any, Any]:
    block = hashlib.sha256(key).digest() if len(key) > _SHA256_BLOCK else key
    block = block.ljust(_SHA256_BLOCK, b"\0")
    inner = hashlib.sha256(bytes(byte ^ 0x36 for byte in block))
    outer = hashlib.sha256(bytes(byte ^ 0x5C for byte in block))
    return inner, outer


@dataclass(frozen=True, slots=True)
class Signature:
    key_id: str
    digest: bytes


def load_signing_keys(path: str | Path, variable: str) -> SigningKeys:
    """The keys in the file; SigningKeysError names `variable` and what is wrong."""
    try:
        document = orjson.loads(Path(path).read_bytes())
    except OSError as error:
        raise SigningKeysError(f"{variable}: cannot read {path}: {error.strerror}") from None
    except orjson.JSONDecodeError:
        raise SigningKeysError(f"{variable}: {path} is not JSON") from None
    return parse_signing_keys(document, variable)


def parse_signing_keys(document: object, variable: str) -> SigningKeys:
    if not isinstance(document, dict) or not isinstance(document.get("keys"), dict):
        raise SigningKeysError(f'{variable}: expected {{"current": ID, "keys": {{ID: base64}}}}')
    keys: dict[str, bytes] = {}
    for key_id, encoded in document["keys"].items():
        if not _KEY_ID.fullmatch(key_id):
            raise SigningKeysError(f"{variable}: key ids are 1-64 of A-Z a-z 0-9 . _ -")
        keys[key_id] = _decoded_key(encoded, key_id, variable)
    if not keys:
        raise SigningKeysError(f"{variable}: no keys")
    current = document.get("current")
    if current is not None and current not in keys:
        raise SigningKeysError(f"{variable}: current key {current!r} is not among the keys")
    return SigningKeys(keys, current)


def _decoded_key(encoded: object, key_id: str, variable: str) -> bytes:
    try:
        key = base64.b64decode(str(encoded), validate=True) if isinstance(encoded, str) else b""
    except binascii.Error:
        raise SigningKeysError(f"{variable}: key {key_id!r} is not base64") from None
    if len(key) < MIN_KEY_BYTES:
        raise SigningKeysError(f"{variable}: key {key_id!r} is shorter than {MIN_KEY_BYTES} bytes")
    return key


def agent_signed_bytes(
    customer_id: str, device_id: str, event_id: str, event_type: str, occurred_at: datetime
) -> bytes:
    fields = (
        customer_id.encode(),
        device_id.encode(),
        event_id.encode(),
        event_type.encode(),
        canonical_time(occurred_at).encode(),
    )
    return _AGENT_PREFIX + b"".join([len(f).to_bytes(4, "big") + f for f in fields])


def console_signed_bytes(value: bytes) -> bytes:
    return _CONSOLE_PREFIX + len(value).to_bytes(4, "big") + value


def canonical_time(at: datetime) -> str:
    """The instant as whole microseconds since the Unix epoch, in decimal."""
    return str((at - EPOCH) // MICROSECOND)


_AGENT_PREFIX = len(AGENT_DOMAIN).to_bytes(4, "big") + AGENT_DOMAIN
_CONSOLE_PREFIX = len(CONSOLE_DOMAIN).to_bytes(4, "big") + CONSOLE_DOMAIN


def sign(keys: SigningKeys, signed: bytes, key_id: str | None = None) -> list[tuple[str, bytes]]:
    """The headers that sign `signed` with `key_id` (default: the current key)."""
    chosen = key_id or keys.current
    if chosen is None or chosen not in keys.keys:
        raise SigningKeysError("no current signing key: name one, or set `current`")
    digest = hmac.digest(keys.keys[chosen], signed, "sha256").hex().encode("ascii")
    return [(KEY_ID_HEADER, chosen.encode("ascii")), (HMAC_HEADER, digest)]


def signature_in(headers: Sequence[tuple[str, bytes]] | None) -> Signature | None:
    """The message's signature, or None if it has none, more than one, or a malformed one."""
    key_ids: list[bytes] = []
    digests: list[bytes] = []
    for name, value in headers or ():
        if name == KEY_ID_HEADER:
            key_ids.append(value)
        elif name == HMAC_HEADER:
            digests.append(value)
    # A digest of the right length that is not lowercase hex simply does not match.
    if len(key_ids) != 1 or len(digests) != 1 or len(digests[0]) != HEX_DIGEST_LENGTH:
        return None
    try:
        key_id = key_ids[0].decode("ascii")
    except UnicodeDecodeError:
        return None
    return Signature(key_id, digests[0])


def unauthenticated_reason(
    keys: SigningKeys, signature: Signature | None, signed: bytes | None = None
) -> str | None:
    """Why the signature does not authenticate `signed`, or None if it does. Without
    `signed`, only its presence and key are checked (before the body is decoded)."""
    if signature is None:
        return "no valid sig.key_id and sig.hmac headers"
    if signature.key_id not in keys.keys:
        return "signed with an unknown key id"
    if signed is None:
        return None
    expected = keys.hex_digest(signature.key_id, signed)
    if not hmac.compare_digest(expected, signature.digest):
        return "signature does not match"
    return None

"""The pseudonym key: the service's one secret of its own (docs/security.md, "The pseudonym
key"). It keys the pseudonyms of purged users and, through a key derived from it, every
license event id, so neither can be recomputed from a guessed user id without it.

The key is text: at least 64 hexadecimal digits (32 bytes), as `openssl rand -hex 32`
prints them. It comes from outside the database (`PSEUDONYM_KEY_FILE`), never from it.
"""

from __future__ import annotations

import hashlib
import hmac
import string

MIN_KEY_BYTES = 32
# The sample value of deploy/kubernetes/secret.yaml before it became a file.
SAMPLE_PREFIX = "change-me"
# Distinct byte values below which 32 or more bytes are obviously not random (a repeated
# byte or a short repeated pattern); 32 random bytes have about 30.
MIN_DISTINCT_BYTES = 16
EVENT_ID_LABEL = b"license-worker/license-event-id/v1"


class PseudonymKeyError(ValueError):
    """A key that must not be used; the message never quotes the key."""


def checked_key(text: str) -> str:
    """The key as configured (surrounding white space removed), or PseudonymKeyError."""
    key = text.strip()
    if key.lower().startswith(SAMPLE_PREFIX):
        raise PseudonymKeyError("is the sample value: create a key with `openssl rand -hex 32`")
    if not key or any(character not in string.hexdigits for character in key) or len(key) % 2:
        raise PseudonymKeyError(
            "must be hexadecimal digits (an even number of them), as `openssl rand -hex 32` "
            "prints them"
        )
    raw = bytes.fromhex(key)
    if len(raw) < MIN_KEY_BYTES:
        raise PseudonymKeyError(
            f"has {len(raw)} bytes; at least {MIN_KEY_BYTES} random bytes "
            f"({2 * MIN_KEY_BYTES} hexadecimal digits) are required"
        )
    if len(set(raw)) < MIN_DISTINCT_BYTES:
        raise PseudonymKeyError("is not random (a repeated byte or pattern)")
    return key


def pseudonym_hmac_key(key: str) -> bytes:
    """The HMAC key of the pseudonyms: the key's text, as the database key was used before
    migration 0009, so pseudonyms made with an exported database key stay verifiable."""
    return key.encode()


def event_id_key(key: str) -> bytes:
    """The HMAC key of license event ids, derived from the pseudonym key under a label of
    its own: a pseudonym and an event id never share a key."""
    return hmac.new(bytes.fromhex(key), EVENT_ID_LABEL, hashlib.sha256).digest()

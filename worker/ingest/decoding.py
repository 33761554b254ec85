"""Raw Kafka message bytes to a validated agent event, or a reason it cannot be one."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

import orjson
from pydantic import TypeAdapter, ValidationError

from schemas import AGENT_EVENT_ADAPTER
from schemas.admin_events import ADMIN_EVENT_ADAPTER, ADMIN_EVENT_TYPES, AdminEventModel
from schemas.agent_events import Heartbeat, Install, Uninstall

AgentEventModel = Heartbeat | Install | Uninstall
M = TypeVar("M")


class RejectReason(StrEnum):
    """Why a message went to the DLQ; a stable label for metrics, headers and alerts."""

    OVERSIZED = "oversized"
    EMPTY = "empty"
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    UNSUPPORTED_SCHEMA_VERSION = "unsupported_schema_version"
    UNKNOWN_TYPE = "unknown_type"
    SCHEMA_VIOLATION = "schema_violation"
    DATABASE_REJECTED = "database_rejected"
    UNKNOWN_SUBSCRIPTION = "unknown_subscription"
    # Not signed by the agents' gateway or the console (worker/trust/signing.py).
    UNAUTHENTICATED = "unauthenticated"
    # An agent signal for a customer the console never created (UNKNOWN_CUSTOMERS=refuse).
    UNKNOWN_CUSTOMER = "unknown_customer"


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: RejectReason
    detail: str


MAX_DETAIL_LENGTH = 1000
AGENT_TYPES = "heartbeat, install, uninstall"
ADMIN_TYPES = ", ".join(ADMIN_EVENT_TYPES)


def decode_agent_event(value: bytes | None, max_bytes: int) -> AgentEventModel | Rejection:
    return _decode(value, max_bytes, AGENT_EVENT_ADAPTER, AGENT_TYPES)


def decode_admin_event(value: bytes | None, max_bytes: int) -> AdminEventModel | Rejection:
    return _decode(value, max_bytes, ADMIN_EVENT_ADAPTER, ADMIN_TYPES)


def _decode(
    value: bytes | None, max_bytes: int, adapter: TypeAdapter[M], known_types: str
) -> M | Rejection:
    if not value:
        return Rejection(RejectReason.EMPTY, "message has no value")
    if len(value) > max_bytes:
        # Checked before parsing: a huge message must not cost memory or CPU to reject.
        return Rejection(RejectReason.OVERSIZED, f"{len(value)} bytes exceeds {max_bytes}")
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError as error:
        return _json_rejection(value, error)
    if not isinstance(document, dict):
        return Rejection(RejectReason.NOT_AN_OBJECT, f"top level is {type(document).__name__}")
    try:
        # The adapter's validator itself: TypeAdapter.validate_python adds a Python call
        # per message that costs a tenth of the validation.
        event = adapter.validator.validate_python(document)
    except ValidationError as error:
        return _validation_rejection(document, error, known_types)
    return _lax_type_rejection(document) or event


def _lax_type_rejection(document: dict[str, object]) -> Rejection | None:
    """Wrong wire types that pydantic's lax mode accepted: `true` as schema version 1, and a
    number or a text of digits as `occurred_at` in Unix seconds or milliseconds (guessed from
    its size, so a typo could date a signal decades off). Checked here, on valid events only,
    because a model validator would cost a quarter of the decoding time."""
    if type(document["schema_version"]) is bool:
        return Rejection(RejectReason.UNSUPPORTED_SCHEMA_VERSION, "schema_version bool")
    occurred_at = document["occurred_at"]
    if not (isinstance(occurred_at, str) and occurred_at[4:5] == "-"):
        return Rejection(RejectReason.SCHEMA_VIOLATION, "occurred_at: must be RFC 3339 text")
    return None


def _json_rejection(value: bytes, error: orjson.JSONDecodeError) -> Rejection:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as unicode_error:
        return Rejection(RejectReason.INVALID_UTF8, _bounded(str(unicode_error)))
    return Rejection(RejectReason.INVALID_JSON, _bounded(str(error)))


def _validation_rejection(
    document: dict[str, object], error: ValidationError, known_types: str
) -> Rejection:
    version = document.get("schema_version", 1)
    if version != 1 or type(version) is bool:
        shown = str(version) if type(version) is int else type(version).__name__
        return Rejection(RejectReason.UNSUPPORTED_SCHEMA_VERSION, f"schema_version {shown}")
    error_types = {detail["type"] for detail in error.errors()}
    if error_types & {"union_tag_invalid", "union_tag_not_found"}:
        return Rejection(RejectReason.UNKNOWN_TYPE, f"type: must be one of {known_types}")
    return Rejection(RejectReason.SCHEMA_VIOLATION, _bounded(_describe(error)))


def _describe(error: ValidationError) -> str:
    # Field locations and messages only: input values may hold personal data and must not
    # reach headers or logs. (pydantic's messages name the expected values, not the input;
    # the one that quotes the input, an unknown union tag, is handled above.)
    return "; ".join(
        f"{'.'.join(str(part) for part in detail['loc'])}: {detail['msg']}"
        for detail in error.errors(include_input=False, include_url=False)
    )


def _bounded(text: str, limit: int = MAX_DETAIL_LENGTH) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."

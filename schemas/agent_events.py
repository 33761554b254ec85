"""Inbound agent events, schema version 1 (topics `agent.heartbeat.v1`, `agent.lifecycle.v1`).

Strict where a wrong value would corrupt accounting (ids, timestamps, `type`), tolerant of
unknown extra fields, which are dropped and never reach the database.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
)

MAX_ID_LENGTH = 200
MAX_TEXT_LENGTH = 512


# Ids are keys, log fields and Kafka keys: control or invisible format characters (bidi
# overrides, zero-width joiners), line separators, or surrounding white space there are an
# agent bug or an attack, and NUL cannot be stored in Postgres text. Inner spaces are fine.
# Patterns (not Python validators) keep validation in pydantic-core's fast path.
IDENTIFIER_PATTERN = r"^[^\p{C}\p{Z}](?:[^\p{Cc}\p{Cf}\p{Zl}\p{Zp}]*[^\p{C}\p{Z}])?$"
_NO_NUL_PATTERN = r"^[^\x00]*$"

Identifier = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_ID_LENGTH, pattern=IDENTIFIER_PATTERN),
]
FreeText = Annotated[str, StringConstraints(max_length=MAX_TEXT_LENGTH, pattern=_NO_NUL_PATTERN)]

# No agent clock is legitimately before the Unix epoch (a reset clock reads 1970 or 1601), and
# every accepted time must stay representable in UTC: year 1 at +14:00 is year 0 in UTC, which
# Python cannot convert and the worker would crash on. A clock far in the future is clamped by
# the worker; the upper bound here only keeps it representable. (pydantic's lax mode would
# also read a number, or a text of digits, as Unix seconds or milliseconds, and `true` as
# schema version 1: worker/ingest/decoding.py refuses those wrong wire types before validation,
# where the check costs a fraction of what a model validator would.)
EARLIEST_EVENT_TIME = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_EVENT_TIME = datetime(9999, 12, 30, tzinfo=UTC)
EventTime = Annotated[
    AwareDatetime,
    Field(
        ge=EARLIEST_EVENT_TIME,
        le=LATEST_EVENT_TIME,
        description="RFC 3339 text with an offset, from 1970-01-01T00:00:00Z to 9999-12-30.",
    ),
]


class DeviceKind(StrEnum):
    BUSINESS = "business"
    PERSONAL = "personal"


class _AgentEventBase(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: Literal[1]
    event_id: Identifier
    customer_id: Identifier
    device_id: Identifier
    user_id: Identifier | None = None
    occurred_at: EventTime
    agent_version: FreeText | None = None

    @property
    def names_user(self) -> bool:
        """Whether the event says who the device's user is (an explicit null does)."""
        return "user_id" in self.model_fields_set


class UserProfile(BaseModel):
    """Personal data of a user (licensing rule 5: purged 90 days after release)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    email: FreeText | None = None
    display_name: FreeText | None = None


class Heartbeat(_AgentEventBase):
    type: Literal["heartbeat"]
    device_kind: DeviceKind | None = None


class Install(_AgentEventBase):
    type: Literal["install"]
    device_kind: DeviceKind
    hostname: FreeText
    os: FreeText
    user: UserProfile | None = None


class Uninstall(_AgentEventBase):
    type: Literal["uninstall"]


AgentEvent = Annotated[Heartbeat | Install | Uninstall, Field(discriminator="type")]
AGENT_EVENT_ADAPTER: TypeAdapter[Heartbeat | Install | Uninstall] = TypeAdapter(AgentEvent)

__all__ = [
    "AGENT_EVENT_ADAPTER",
    "AgentEvent",
    "DeviceKind",
    "Heartbeat",
    "Install",
    "Uninstall",
    "UserProfile",
]

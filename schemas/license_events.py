"""Outbound license events, schema version 1 (topic `license.events.v1`, key `customer_id`).

`event_id` is deterministic: the same decision always has the same id, so billing can
de-duplicate an event published twice.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, TypeAdapter

LicenseEventType = Literal[
    "license.allocated",
    "license.released",
    "user.purged",
    "subscription.activated",
    "customer.inactivated",
    "usage.snapshot",
]


class LicenseEvent(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    schema_version: Literal[1] = 1
    event_id: str
    type: LicenseEventType
    customer_id: str
    subject_type: Literal["user", "device"] | None
    subject_id: str | None
    reason: str | None
    # Why a device holds its license: unassigned, over_allowance, device_model (or user).
    basis: str | None = None
    effective_at: AwareDatetime
    emitted_at: AwareDatetime


LICENSE_EVENT_ADAPTER: TypeAdapter[LicenseEvent] = TypeAdapter(LicenseEvent)

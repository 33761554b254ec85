"""Outbound license events, schema version 1 (topic `license.events.v1`, key `customer_id`).

`event_id` is deterministic: the same decision always has the same id, so billing can
de-duplicate an event published twice; two decisions are two ids, even for one subject with
one effective time (allocated, released, allocated again).

License events (`license.*`, `user.purged`, `user.erased`, `device.erased`) have a user or a
device as subject (`license.package_changed`, reason `subscription_changed`: a held license
is attributed to another package from `effective_at` on, and stays held); subscription
events a subscription; `customer.*` and `usage.snapshot` the customer. `user.erased` and
`customer.erased` (reason `erasure_requested`) follow an erasure on request: the subject's
licenses were released before (`license.released`, reason `erasure_requested`, under the
ids billing knows); the erased user's `subject_id` is their pseudonym. Each type may add its
own fields (a subscription's `status` and `trial_ends_at`, a snapshot's counts).
"""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter

LicenseEventType = Literal[
    "license.allocated",
    "license.released",
    "license.package_changed",
    "user.purged",
    "user.erased",
    "device.erased",
    "subscription.attached",
    "subscription.activated",
    "subscription.cancelled",
    "subscription.trial_changed",
    "subscription.over_seats",
    "subscription.within_seats",
    "customer.inactivated",
    "customer.reactivated",
    "customer.erased",
    "usage.snapshot",
]


class LicenseEvent(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    schema_version: Literal[1] = 1
    event_id: str
    type: LicenseEventType
    customer_id: str
    subject_type: Literal["user", "device", "subscription", "customer"] | None
    subject_id: str | None
    reason: str | None
    # Why a device holds its license: unassigned, over_allowance, device_model (or user).
    basis: str | None = None
    # The subscription package the license (or subscription) is attributed to; None when the
    # customer holds no live subscription.
    package: Literal["core", "core_plus"] | None = None
    effective_at: AwareDatetime
    emitted_at: AwareDatetime
    # `license.allocated`, `license.released` and `license.package_changed` only: the
    # subject's license event number, 1 for its first and one more for each next (a purged
    # user who returns starts at 1 again). The last event of a subject is the one with the
    # highest number; a gap means an event is missing.
    sequence: int | None = None
    previous_package: Literal["core", "core_plus"] | None = Field(
        default=None,
        description=(
            "license.package_changed only: the package the held license was attributed to "
            "before the change (`package` is the new one); null: no live subscription applied."
        ),
    )


LICENSE_EVENT_ADAPTER: TypeAdapter[LicenseEvent] = TypeAdapter(LicenseEvent)

"""Inbound administrative events from the MSP console, schema version 1 (topic
`tenant.admin.v1`, key `customer_id`).

Like the agent events: strict on ids, timestamps and `type`; unknown extra fields are dropped.
`occurred_at` is when the admin made the change; it orders changes to the same thing, so a
redelivered or late message never undoes a newer one.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from schemas.agent_events import EventTime, FreeText, Identifier


class Package(StrEnum):
    """Subscription packages, lowest first: when several apply to a user, the highest wins."""

    CORE = "core"
    CORE_PLUS = "core_plus"


class SubscriptionStatus(StrEnum):
    IN_TRIAL = "in_trial"
    ACTIVE = "active"
    CANCELLED = "cancelled"


class LicenseModel(StrEnum):
    USER = "user"
    DEVICE = "device"


class _AdminEventBase(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: Literal[1]
    event_id: Identifier
    customer_id: Identifier
    occurred_at: EventTime


class CustomerUpserted(_AdminEventBase):
    """`customer.created` or `customer.updated`: both create the customer if it is new.
    A field left out keeps its stored value (a new customer gets the `user` model)."""

    type: Literal["customer.created", "customer.updated"]
    name: FreeText | None = None
    license_model: LicenseModel | None = None


class CustomerInactivated(_AdminEventBase):
    """Deleting a customer in the console: its licenses are released and billing stops."""

    type: Literal["customer.inactivated"]


class CustomerReactivated(_AdminEventBase):
    type: Literal["customer.reactivated"]


class SubscriptionAttached(_AdminEventBase):
    """A subscription attached to the customer (`group_id` null) or to a user group. Sending
    it again with the same `subscription_id` updates it."""

    type: Literal["subscription.attached"]
    subscription_id: Identifier
    package: Package
    group_id: Identifier | None = None
    status: Literal[SubscriptionStatus.IN_TRIAL, SubscriptionStatus.ACTIVE]
    trial_ends_at: EventTime | None = None
    seats: int | None = Field(default=None, ge=0, le=10_000_000)

    @model_validator(mode="after")
    def _trial_has_an_end(self) -> Self:
        _require_trial_end(self.status, self.trial_ends_at)
        return self


class SubscriptionStatusChanged(_AdminEventBase):
    """A status changed by hand: activate a trial early, extend it, or cancel."""

    type: Literal["subscription.status_changed"]
    subscription_id: Identifier
    status: SubscriptionStatus
    trial_ends_at: EventTime | None = None

    @model_validator(mode="after")
    def _trial_has_an_end(self) -> Self:
        _require_trial_end(self.status, self.trial_ends_at)
        return self


def _require_trial_end(status: SubscriptionStatus, trial_ends_at: object) -> None:
    if status is SubscriptionStatus.IN_TRIAL and trial_ends_at is None:
        raise ValueError("a subscription in_trial needs trial_ends_at")


class GroupMemberAdded(_AdminEventBase):
    type: Literal["group.member_added"]
    group_id: Identifier
    user_id: Identifier


class GroupMemberRemoved(_AdminEventBase):
    type: Literal["group.member_removed"]
    group_id: Identifier
    user_id: Identifier


AdminEventModel = (
    CustomerUpserted
    | CustomerInactivated
    | CustomerReactivated
    | SubscriptionAttached
    | SubscriptionStatusChanged
    | GroupMemberAdded
    | GroupMemberRemoved
)
AdminEvent = Annotated[AdminEventModel, Field(discriminator="type")]
ADMIN_EVENT_ADAPTER: TypeAdapter[AdminEventModel] = TypeAdapter(AdminEvent)
ADMIN_EVENT_TYPES = (
    "customer.created",
    "customer.updated",
    "customer.inactivated",
    "customer.reactivated",
    "subscription.attached",
    "subscription.status_changed",
    "group.member_added",
    "group.member_removed",
)

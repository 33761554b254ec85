"""Pure decisions of the sweeper: how far ingestion has caught up, which customers the
outage guard holds, and pseudonyms for purged users."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

PartitionKey = tuple[str, int]


@dataclass(frozen=True, slots=True)
class StoredProgress:
    next_offset: int
    last_message_at: datetime


def ingestion_watermark(
    end_offsets: Mapping[PartitionKey, int],
    progress: Mapping[PartitionKey, StoredProgress],
    now: datetime,
) -> datetime | None:
    """The time up to which every agent message has been stored: `now` when every partition
    is caught up, else the broker time of the newest stored message of the laggiest one.
    None when a partition with messages has had none stored (nothing can be concluded)."""
    watermark = now
    for partition, end_offset in end_offsets.items():
        stored = progress.get(partition)
        if stored is not None and stored.next_offset >= end_offset:
            continue
        if end_offset == 0:
            continue
        if stored is None:
            return None
        watermark = min(watermark, stored.last_message_at)
    return watermark


@dataclass(frozen=True, slots=True)
class CustomerRisk:
    customer_id: str
    at_risk: int
    active: int


def customers_to_hold(
    risks: Iterable[CustomerRisk], max_share: float, min_releases: int
) -> list[CustomerRisk]:
    """The outage guard: a run that would release more than `max_share` of a customer's
    active licenses (and at least `min_releases` of them, so small customers are not held
    for one lost laptop) looks like an outage of ours or theirs, not 30 days of silence."""
    return [
        risk
        for risk in risks
        if risk.at_risk >= min_releases and risk.at_risk > max_share * max(risk.active, 1)
    ]


def pseudonym(key: bytes, customer_id: str, user_id: str, released_at: datetime) -> str:
    """Stands in for a purged user id. Keyed, so it cannot be recomputed from a guessed
    e-mail without the key; includes the release time, so a user who came back and was
    purged again gets a second, different pseudonym."""
    message = "\x00".join((customer_id, user_id, released_at.isoformat())).encode()
    return "purged-" + hmac.new(key, message, hashlib.sha256).hexdigest()[:32]

"""Published license events leave the outbox after OUTBOX_RETENTION_DAYS (issue #15 part 3):
only through the SECURITY DEFINER function of migration 0013, only rows published before
the retention, a bounded batch per call, by the relay leader on its (settable) clock. Real
Kafka and Postgres."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from tests.support import (
    ROLES,
    Services,
    fetch,
    fetchval,
    make_settings,
    running_worker,
    wait_until,
)
from worker.clock import FixedClock
from worker.licensing.relay import publish_pending_once
from worker.settings import Settings

pytestmark = pytest.mark.integration

PRUNE = "SELECT prune_published_license_events($1::timestamptz, $2::interval, $3::integer)"
NOW = datetime.now(UTC)


@pytest.fixture
def settings(services: Services, database_url: str, topics: dict[str, str]) -> Settings:
    return make_settings(
        services, database_url, topics, sweep_enabled=False, outbox_retention_days=7
    )


async def add_outbox_row(superuser: str, published_at: datetime | None) -> uuid.UUID:
    event_id = uuid.uuid4()
    await fetch(
        superuser,
        "INSERT INTO customers (customer_id, first_seen_at) VALUES ('acme', now()) "
        "ON CONFLICT DO NOTHING",
    )
    await fetch(
        superuser,
        "INSERT INTO license_outbox (event_id, customer_id, subject_type, subject_id, payload, "
        "created_at, published_at) VALUES ($1, 'acme', 'device', $2, $3::jsonb, $4, $5)",
        event_id,
        f"device-{event_id}",
        orjson.dumps({"type": "license.allocated", "event_id": str(event_id)}).decode(),
        (published_at or NOW) - timedelta(minutes=1),
        published_at,
    )
    return event_id


async def remaining(url: str) -> set[uuid.UUID]:
    return {row["event_id"] for row in await fetch(url, "SELECT event_id FROM license_outbox")}


def pruned_total() -> float:
    return REGISTRY.get_sample_value("license_worker_outbox_pruned_total") or 0.0


async def test_the_function_deletes_only_published_rows_older_than_the_retention(
    services: Services, database_url: str
) -> None:
    superuser = services.superuser_url(database_url)
    never_published = await add_outbox_row(superuser, None)
    published_long_ago = await add_outbox_row(superuser, NOW - timedelta(days=30))
    published_past_retention = await add_outbox_row(superuser, NOW - timedelta(days=7, hours=1))
    published_within_retention = await add_outbox_row(superuser, NOW - timedelta(days=6))
    published_just_now = await add_outbox_row(superuser, NOW)

    pruned = await fetchval(database_url, PRUNE, NOW, timedelta(days=7), 100)

    assert pruned == 2
    assert await remaining(database_url) == {
        never_published,
        published_within_retention,
        published_just_now,
    }
    assert published_long_ago not in await remaining(database_url)
    assert published_past_retention not in await remaining(database_url)
    # Even a clock far ahead never reaches a row not published.
    assert await fetchval(database_url, PRUNE, NOW + timedelta(days=3650), timedelta(days=1), 100)
    assert await remaining(database_url) == {never_published}


async def test_the_function_deletes_a_bounded_batch_per_call(
    services: Services, database_url: str
) -> None:
    superuser = services.superuser_url(database_url)
    for _ in range(5):
        await add_outbox_row(superuser, NOW - timedelta(days=30))
    assert await fetchval(database_url, PRUNE, NOW, timedelta(days=7), 2) == 2
    assert await fetchval(database_url, "SELECT count(*) FROM license_outbox") == 3
    assert await fetchval(database_url, PRUNE, NOW, timedelta(days=7), 2) == 2
    assert await fetchval(database_url, PRUNE, NOW, timedelta(days=7), 2) == 1
    assert await fetchval(database_url, PRUNE, NOW, timedelta(days=7), 2) == 0


@pytest.mark.parametrize(
    ("retention", "max_rows"),
    [
        (timedelta(hours=23), 10),
        (timedelta(0), 10),
        (timedelta(days=-7), 10),
        (None, 10),
        (timedelta(days=7), 0),
        (timedelta(days=7), 10_001),
        (timedelta(days=7), None),
    ],
)
async def test_the_function_refuses_a_short_retention_or_an_unbounded_batch(
    services: Services, database_url: str, retention: timedelta | None, max_rows: int | None
) -> None:
    superuser = services.superuser_url(database_url)
    kept = await add_outbox_row(superuser, NOW - timedelta(days=2))
    with pytest.raises(asyncpg.InvalidParameterValueError):
        await fetchval(database_url, PRUNE, NOW, retention, max_rows)
    assert await remaining(database_url) == {kept}


async def test_the_worker_cannot_delete_outbox_rows_itself_and_the_reporter_cannot_prune(
    services: Services, database_url: str
) -> None:
    superuser = services.superuser_url(database_url)
    kept = await add_outbox_row(superuser, NOW - timedelta(days=30))
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await fetch(database_url, "DELETE FROM license_outbox")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await fetch(services.reporter_url(database_url), PRUNE, NOW, timedelta(days=7), 10)
    assert await remaining(database_url) == {kept}


async def test_the_relay_prunes_what_it_published_once_the_retention_has_passed(
    services: Services, settings: Settings
) -> None:
    url = settings.database_url.get_secret_value()
    superuser = services.superuser_url(url)
    events = {await add_outbox_row(superuser, None) for _ in range(3)}
    before = pruned_total()

    # Published now: within the retention, kept.
    assert await publish_pending_once(settings, FixedClock(datetime.now(UTC)), prune=True) == 3
    assert await remaining(url) == events
    assert pruned_total() == before

    # A week and an hour later (the relay's clock), pruned in batches of two; an old row not
    # published yet (an allocation still waiting to settle) stays.
    unpublished = await add_outbox_row(superuser, None)
    later = datetime.now(UTC) + timedelta(days=settings.outbox_retention_days, hours=1)
    await fetch(
        superuser,
        "UPDATE license_outbox SET created_at = $2, settles_at = $3 WHERE event_id = $1",
        unpublished,
        NOW - timedelta(days=30),
        later + timedelta(days=1),
    )
    small_batches = settings.model_copy(update={"outbox_prune_batch_size": 2})
    assert await publish_pending_once(small_batches, FixedClock(later), prune=True) == 0
    assert await remaining(url) == {unpublished}
    assert pruned_total() == before + 3


async def test_a_refused_prune_never_holds_up_publication(
    services: Services, settings: Settings
) -> None:
    """`create-roles` not run again after `migrate`: the worker may not call the function.
    The relay publishes all the same, and says why nothing is pruned."""
    url = settings.database_url.get_secret_value()
    superuser = services.superuser_url(url)
    old = await add_outbox_row(superuser, NOW - timedelta(days=30))
    await fetch(
        superuser,
        "REVOKE EXECUTE ON FUNCTION prune_published_license_events(timestamptz, interval, "
        f"integer) FROM {ROLES.worker}",
    )
    pending = {await add_outbox_row(superuser, None) for _ in range(2)}

    with capture_logs() as logs:
        assert await publish_pending_once(settings, FixedClock(datetime.now(UTC)), prune=True) == 2

    assert await remaining(url) == pending | {old}
    assert [entry["event"] for entry in logs if entry["log_level"] == "error"] == [
        "relay.prune_refused"
    ]


async def test_publish_events_with_a_clock_ahead_prunes_nothing(
    services: Services, settings: Settings
) -> None:
    """`publish-events --now T` (one-shot, any T) publishes; only the relay in `run` prunes."""
    url = settings.database_url.get_secret_value()
    superuser = services.superuser_url(url)
    published = await add_outbox_row(superuser, NOW - timedelta(days=30))
    pending = await add_outbox_row(superuser, None)
    later = datetime.now(UTC) + timedelta(days=365)
    assert await publish_pending_once(settings, FixedClock(later)) == 1
    assert await remaining(url) == {published, pending}


async def test_the_relay_inside_run_prunes_on_its_clock(
    services: Services, settings: Settings
) -> None:
    """`run`'s relay (the leader) prunes after publishing; its clock is the worker's."""
    url = settings.database_url.get_secret_value()
    superuser = services.superuser_url(url)
    recent = await add_outbox_row(superuser, NOW - timedelta(days=1))
    for _ in range(3):
        await add_outbox_row(superuser, NOW - timedelta(days=10))
    before = pruned_total()

    async def only_the_recent_one_is_left() -> bool:
        return await remaining(url) == {recent}

    async with running_worker(settings, clock=FixedClock(datetime.now(UTC))):
        await wait_until(only_the_recent_one_is_left, timeout=30)
    assert pruned_total() == before + 3

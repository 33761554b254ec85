"""No hot rows (issue 15, part 5): batches and decisions serialise with console changes and
erasures on a transaction-scoped advisory lock per customer, not on the customer's row, so
concurrent batches of one customer write nothing to it (no row lock, no multixact)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

import orjson
import pytest

from schemas.admin_events import AdminEventModel
from tests.integration.license_support import admin_event, day
from tests.integration.test_concurrent_writes import WINDOW, agent, write
from tests.support import fetch, fetchval
from worker.db.repository import Repository
from worker.db.session import Session
from worker.ingest.coalesce import coalesce
from worker.ingest.decoding import Rejection, decode_admin_event
from worker.licensing.decisions import Group, decide_groups
from worker.licensing.rules import SubjectType
from worker.tenants.changes import apply_admin_event

pytestmark = pytest.mark.integration

EVENT_KEY = bytes(range(32))
TOLERANCE = timedelta(minutes=5)
# The class id of the customer locks (two-int form): hashtext('license-telemetry:customer').
CUSTOMER_LOCK_CLASS = 773629486


async def customer_xmax(database_url: str) -> str:
    """The `xmax` of acme's row: a row lock (or a multixact of them) is written there."""
    return str(
        await fetchval(database_url, "SELECT xmax FROM customers WHERE customer_id = 'acme'")
    )


async def customer_locks_held(database_url: str, mode: str) -> int:
    return int(
        await fetchval(
            database_url,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND objsubid = 2 AND classid = $1 AND mode = $2",
            CUSTOMER_LOCK_CLASS,
            mode,
        )
    )


async def heartbeat_and_decide(session: Session, device: str, now: datetime) -> None:
    """A batch (a heartbeat of `device`), then a decision about the device."""
    changes = coalesce([agent("heartbeat", device, now)], now, TOLERANCE)
    await session.write_signals(changes, [], now - WINDOW)
    group = Group("acme", SubjectType.DEVICE, device)
    await decide_groups(session, [group], now, now, WINDOW, event_key=EVENT_KEY)


@asynccontextmanager
async def batch_in_progress(repository: Repository, device: str) -> AsyncIterator[None]:
    """A batch and its decision about a known device, uncommitted."""
    async with repository.transaction() as session:
        await heartbeat_and_decide(session, device, day(1))
        yield


async def test_concurrent_batches_of_one_customer_leave_its_row_untouched(
    database_url: str,
) -> None:
    repository = await Repository.connect(database_url, 3)
    try:
        await write(
            repository, [agent("install", d, day(0)) for d in ("kiosk-1", "kiosk-2")], day(0)
        )
        before = await customer_xmax(database_url)
        async with (
            batch_in_progress(repository, "kiosk-1"),
            batch_in_progress(repository, "kiosk-2"),
        ):
            assert await customer_xmax(database_url) == before, "no row lock on the customer"
            assert await customer_locks_held(database_url, "ShareLock") == 2
        await write(repository, [agent("heartbeat", "kiosk-1", day(2))], day(2))
    finally:
        await repository.close()
    assert await customer_xmax(database_url) == before
    assert await customer_locks_held(database_url, "ShareLock") == 0, "released at commit"


async def sweeper_deciding(repository: Repository, device: str, now: datetime) -> None:
    """A decision without a batch before it in its transaction, as the sweeper makes."""
    async with repository.transaction() as session:
        group = Group("acme", SubjectType.DEVICE, device)
        await decide_groups(session, [group], now, now, WINDOW, event_key=EVENT_KEY)


def decode(event: dict[str, object]) -> AdminEventModel:
    decoded = decode_admin_event(orjson.dumps(event), 65_536)
    assert not isinstance(decoded, Rejection), decoded
    return decoded


async def test_a_decision_waits_for_a_console_change_and_reads_what_it_wrote(
    database_url: str,
) -> None:
    """The console inactivates acme while a decision about one of its devices starts: the
    decision waits, then reads the customer's row after the change (not a snapshot taken
    before it waited), and allocates nothing."""
    now = day(0)
    repository = await Repository.connect(database_url, 3)
    try:
        await write(repository, [agent("install", "kiosk", now)], now)
        inactivated = decode(admin_event("customer.inactivated", "acme", now))
        async with repository.transaction() as console:
            await apply_admin_event(console, inactivated, now, WINDOW, event_key=EVENT_KEY)
            assert await customer_locks_held(database_url, "ExclusiveLock") == 1
            decision = asyncio.create_task(sweeper_deciding(repository, "kiosk", now))
            await asyncio.sleep(0.5)
            assert not decision.done(), "the decision waits for the console change"
        await asyncio.wait_for(decision, 10)
    finally:
        await repository.close()
    assert await fetch(database_url, "SELECT subject_id FROM licenses WHERE active") == []


async def test_a_decision_waits_for_a_customers_erasure_in_progress(database_url: str) -> None:
    """The statements with which an erasure (or a legal hold) locks its customer hold off the
    customer's decisions until it commits, and its row stays locked for the purge."""
    now = day(0)
    repository = await Repository.connect(database_url, 3)
    try:
        await write(repository, [agent("install", "kiosk", now)], now)
        async with repository.transaction() as erasure:
            await erasure.execute("lock_customer_key", "acme")
            await erasure.fetch("lock_customer_for_erasure", "acme")
            decision = asyncio.create_task(sweeper_deciding(repository, "kiosk", now))
            await asyncio.sleep(0.5)
            assert not decision.done(), "the decision waits for the erasure"
            row_locked = await fetch(database_url, "SELECT 1 FROM customers FOR SHARE SKIP LOCKED")
            assert row_locked == [], "the purge skips the customer"
        await asyncio.wait_for(decision, 10)
    finally:
        await repository.close()

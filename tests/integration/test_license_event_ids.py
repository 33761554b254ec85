"""Every license decision reaches billing under an id of its own, and the topic agrees with
the stored licenses (`license-worker reconcile`)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from tests.integration.license_support import (
    ALICE,
    billing_view,
    day,
    ingest,
    publish_outbox,
    send,
    sweeper_at,
)
from tests.support import Services, fetch, fetchval, make_settings, run_cli, settings_environment
from worker.db.errors import ConcurrentDecisionError, is_transient_database_error
from worker.db.repository import Repository
from worker.db.session import LicenseRow
from worker.licensing.reconcile import SubjectMismatch, reconcile_subjects
from worker.settings import Settings
from worker.sim.fleet import SimulatedDevice

pytestmark = pytest.mark.integration

# Alice's second business device: over her allowance while the laptop counts.
ALICE_DESKTOP = SimulatedDevice("acme", "alice-desktop", ALICE.user_id, "business")


@pytest.fixture
def settings(services: Services, database_url: str, topics: dict[str, str]) -> Settings:
    # No relay in the worker: the tests publish the outbox themselves, after tampering.
    return make_settings(services, database_url, topics, sweep_enabled=False, relay_enabled=False)


async def _one_batch(
    services: Services, settings: Settings, event: tuple[SimulatedDevice, str, int], total: int
) -> int:
    device, event_type, minutes = event
    at = day(0) + timedelta(minutes=minutes)
    total += await send(services, settings, [(device, event_type, at)])
    await ingest(services, settings, at + timedelta(minutes=1), total)
    return total


async def _reallocate_the_desktop(services: Services, settings: Settings) -> None:
    """The fault run's sequence, one batch each: the desktop is allocated, released when the
    laptop's uninstall lets the user cover it, and allocated again when the laptop returns,
    with the same effective time both times (its newest signal did not move)."""
    total = 0
    for event in [
        (ALICE, "install", 0),
        (ALICE_DESKTOP, "install", 10),
        (ALICE, "uninstall", 60),
        (ALICE, "heartbeat", 120),
    ]:
        total = await _one_batch(services, settings, event, total)


async def test_a_reallocation_with_an_unchanged_effective_time_reaches_billing(
    services: Services, settings: Settings
) -> None:
    await _reallocate_the_desktop(services, settings)
    url = settings.database_url.get_secret_value()
    history = await fetch(
        url,
        "SELECT change, event_id FROM license_history WHERE subject_id = $1 ORDER BY id",
        ALICE_DESKTOP.device_id,
    )
    assert [row["change"] for row in history] == ["allocated", "released", "allocated"]
    assert len({row["event_id"] for row in history}) == 3, "one id per decision"
    assert await fetchval(url, "SELECT count(*) FROM license_outbox") == 4

    await publish_outbox(settings)
    events = await billing_view(services, settings, 4)
    desktop = [e for e in events if e["subject_id"] == ALICE_DESKTOP.device_id]
    assert [(e["type"], e["reason"], e["sequence"]) for e in desktop] == [
        ("license.allocated", "first_signal", 1),
        ("license.released", "covered_by_user", 2),
        ("license.allocated", "reactivated", 3),
    ]
    assert await _mismatches(settings) == []
    agreed = await asyncio.to_thread(run_cli, settings_environment(settings), "reconcile")
    assert agreed.returncode == 0, agreed.stderr
    assert "billing's view agrees" in agreed.stdout


async def test_reconcile_finds_a_subject_whose_last_event_disagrees_with_the_database(
    services: Services, settings: Settings
) -> None:
    await _reallocate_the_desktop(services, settings)
    url = settings.database_url.get_secret_value()
    # The lost re-allocation of the defect: its outbox row never reached the topic. (The
    # worker role may not delete from the outbox: the owner stages the loss.)
    await fetch(
        services.owner_url(url),
        "DELETE FROM license_outbox WHERE id = (SELECT max(id) FROM license_outbox)",
    )
    await publish_outbox(settings)
    await billing_view(services, settings, 3)
    [mismatch] = await _mismatches(settings)
    assert (mismatch.subject_id, mismatch.stored_active, mismatch.last_event_type) == (
        ALICE_DESKTOP.device_id,
        True,
        "license.released",
    )
    assert "alice-desktop" in mismatch.describe()
    found = await asyncio.to_thread(run_cli, settings_environment(settings), "reconcile")
    assert found.returncode == 8
    assert "acme device alice-desktop: last event is not license.allocated" in found.stdout
    assert "1 differ" in found.stderr


async def _mismatches(settings: Settings) -> list[SubjectMismatch]:
    repository = await Repository.connect(settings.database_url.get_secret_value(), 1)
    try:
        result = await reconcile_subjects(settings, repository)
    finally:
        await repository.close()
    assert result.pending == 0
    assert result.unreadable_events == 0
    return result.mismatches


async def test_a_decision_made_on_a_state_that_changed_since_writes_nothing(
    services: Services, settings: Settings
) -> None:
    """Two deciders read the desktop at event #3; the second one's write would reuse #4.
    It is refused as a transient error, so its batch is decided again from the new state."""
    await _reallocate_the_desktop(services, settings)
    url = settings.database_url.get_secret_value()
    release = LicenseRow(
        customer_id="acme",
        subject_type="device",
        subject_id=ALICE_DESKTOP.device_id,
        change="released",
        basis="over_allowance",
        reason="inactive_30d",
        effective_at=day(31),
        event_id=None,
        payload=None,
        event_sequence=4,
    )
    repository = await Repository.connect(url, 2)
    try:
        async with repository.transaction() as session:
            await session.write_license_changes([release], day(31))
        with pytest.raises(ConcurrentDecisionError) as raced:
            async with repository.transaction() as session:
                await session.write_license_changes([release], day(31))
    finally:
        await repository.close()
    assert is_transient_database_error(raced.value)
    [row] = await fetch(
        url,
        "SELECT active, event_sequence FROM licenses WHERE subject_id = $1",
        ALICE_DESKTOP.device_id,
    )
    assert (row["active"], row["event_sequence"]) == (False, 4)
    assert (
        await fetchval(
            url,
            "SELECT count(*) FROM license_history WHERE subject_id = $1",
            ALICE_DESKTOP.device_id,
        )
        == 4
    )


async def test_a_user_is_purged_only_once_their_release_reached_billing(
    services: Services, settings: Settings
) -> None:
    """The purge rewrites the user's id in the outbox: had the release still been waiting
    there, billing would have received it under the pseudonym and kept charging the user."""
    total = await send(services, settings, [(ALICE, "install", day(0))])
    await ingest(services, settings, day(0) + timedelta(minutes=5), total)
    async with sweeper_at(settings, day(31)) as sweeper:
        assert (await sweeper.run_once()).released == 1
    async with sweeper_at(settings, day(121)) as sweeper:
        assert (await sweeper.run_once()).purged == 0, "the release is still in the outbox"
    await publish_outbox(settings)
    async with sweeper_at(settings, day(121)) as sweeper:
        assert (await sweeper.run_once()).purged == 1
    await publish_outbox(settings)
    # Each pass on a new day also sends the customer's usage snapshot.
    events = await billing_view(services, settings, 5)
    subject_events = [e for e in events if e["type"] != "usage.snapshot"]
    assert [(e["type"], e["subject_id"] == ALICE.user_id) for e in subject_events] == [
        ("license.allocated", True),
        ("license.released", True),
        ("user.purged", False),
    ]
    assert await _mismatches(settings) == []

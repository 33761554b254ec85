"""`license-worker reconcile --from --to` (issue #18, part 5): the license events topic,
folded as billing folds it, against the daily usage snapshots and `report usage --as-of` on
real Kafka and Postgres. A clean timeline agrees; an event lost on its way to the topic, or
a forged one on it, is named by customer, day and package."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, date, timedelta

import orjson
import pytest

from tests.integration.license_support import (
    ALICE_DEVICES,
    KIOSK,
    day,
    ingest,
    publish_outbox,
    send,
    sweep,
)
from tests.support import (
    Services,
    fetch,
    make_settings,
    produce,
    run_cli,
    settings_environment,
)
from worker.db.repository import Repository
from worker.licensing.reconcile_days import DailyReconciliation, days_between, reconcile_days
from worker.settings import Settings
from worker.sim.fleet import SimulatedDevice

pytestmark = pytest.mark.integration

DECIDED = day(0) + timedelta(minutes=1)
FIRST_DAY = DECIDED.astimezone(UTC).date()
LAST_DAY = (day(32) + timedelta(minutes=1)).astimezone(UTC).date()


@pytest.fixture
def settings(services: Services, database_url: str, topics: dict[str, str]) -> Settings:
    # The tests publish the outbox themselves (after tampering with it, for one).
    return make_settings(services, database_url, topics, sweep_enabled=False, relay_enabled=False)


async def _ingest_day_0(services: Services, settings: Settings) -> None:
    """Alice's four devices (the watch over her allowance) and a kiosk, installed on day 0."""
    installs = [(d, "install", day(0)) for d in [*ALICE_DEVICES, KIOSK]]
    await ingest(services, settings, DECIDED, await send(services, settings, installs))


async def _sweep_the_timeline(settings: Settings) -> None:
    """A sweep on day 1 (its usage snapshot) and on day 31: every license released through
    silence, effective day 30, decided day 31."""
    await sweep(settings, day(1) + timedelta(minutes=1))
    await sweep(settings, day(31) + timedelta(minutes=1))


async def _reconcile(settings: Settings) -> DailyReconciliation:
    repository = await Repository.connect(settings.database_url.get_secret_value(), 2)
    try:
        return await reconcile_days(settings, repository, days_between(FIRST_DAY, LAST_DAY))
    finally:
        await repository.close()


async def _cli(settings: Settings, *arguments: str) -> tuple[int, str, str]:
    done = await asyncio.to_thread(
        run_cli,
        settings_environment(settings),
        "reconcile",
        "--from",
        FIRST_DAY.isoformat(),
        "--to",
        LAST_DAY.isoformat(),
        *arguments,
    )
    return done.returncode, done.stdout, done.stderr


async def test_a_clean_timeline_reconciles_every_day_with_snapshots_and_report(
    services: Services, settings: Settings
) -> None:
    await _ingest_day_0(services, settings)
    await publish_outbox(settings)
    await _sweep_the_timeline(settings)
    result = await _reconcile(settings)
    assert result.differences == []
    assert result.anomalies == []
    assert result.snapshots == 2  # day 1 and day 31
    assert result.compared == len(result.days) + 2
    assert (result.pending, result.unreadable) == (0, 0)
    # The bill counts by effective time: alice, her watch and the kiosk until day 30 (the
    # releases' effect), nothing from then on, although the service decided them on day 31.
    bill = result.bill()
    released_on = (day(30)).astimezone(UTC).date()
    assert bill[FIRST_DAY] == Counter({("acme", "none"): 3})
    assert bill[released_on - timedelta(days=1)] == Counter({("acme", "none"): 3})
    assert bill[released_on] == Counter()
    status, out, err = await _cli(settings, "--bill")
    assert status == 0, err
    assert "no difference" in out
    assert f"acme      none     {FIRST_DAY}..{released_on - timedelta(days=1)}  3" in out


async def test_an_event_decided_but_not_published_yet_is_pending_not_a_difference(
    services: Services, settings: Settings
) -> None:
    await _ingest_day_0(services, settings)
    await publish_outbox(settings)
    late = SimulatedDevice("acme", "kiosk-2", None, "business")
    at = day(32)
    sent = await send(services, settings, [(late, "install", at)])
    await ingest(services, settings, at, 5 + sent)
    result = await _reconcile(settings)
    assert result.pending >= 1
    assert result.differences == []
    assert result.anomalies == []


async def test_an_event_lost_before_the_relay_is_named_by_customer_day_and_package(
    services: Services, settings: Settings
) -> None:
    await _ingest_day_0(services, settings)
    url = settings.database_url.get_secret_value()
    # The kiosk's allocation never reaches the topic (the worker role may not delete from the
    # outbox: the owner stages the loss).
    await fetch(
        services.owner_url(url),
        "DELETE FROM license_outbox WHERE subject_id = $1 AND payload->>'type' = $2",
        KIOSK.device_id,
        "license.allocated",
    )
    await publish_outbox(settings)
    await _sweep_the_timeline(settings)
    result = await _reconcile(settings)
    first = result.differences[0]
    assert (first.customer_id, first.day, first.package) == ("acme", FIRST_DAY, "none")
    assert (first.topic, first.snapshot, first.report) == (2, None, 3)
    snapshot_day = (day(1) + timedelta(minutes=1)).astimezone(UTC).date()
    [at_snapshot] = [d for d in result.differences if d.snapshot is not None]
    assert (at_snapshot.day, at_snapshot.topic, at_snapshot.snapshot, at_snapshot.report) == (
        snapshot_day,
        2,
        3,
        3,
    )
    assert [a.problem for a in result.anomalies] == ["#2 released of a license not held"]
    status, out, err = await _cli(settings)
    assert status == 8
    assert f"acme      {FIRST_DAY}  none" in out
    assert "cannot fold: acme device kiosk-1: #2 released of a license not held" in out
    assert "differences:" in err


async def test_a_forged_license_event_on_the_topic_is_a_difference_from_its_day_on(
    services: Services, settings: Settings
) -> None:
    await _ingest_day_0(services, settings)
    await publish_outbox(settings)
    await _sweep_the_timeline(settings)
    forged_at = day(2)
    forged = {
        "schema_version": 1,
        "event_id": "f0f0f0f0-0000-8000-8000-000000000001",
        "type": "license.allocated",
        "customer_id": "acme",
        "subject_type": "device",
        "subject_id": "forged-1",
        "reason": "first_signal",
        "basis": "unassigned",
        "package": None,
        "sequence": 1,
        "effective_at": forged_at.isoformat(),
        "emitted_at": forged_at.isoformat(),
    }
    await produce(
        services.kafka_bootstrap_servers,
        settings.license_events_topic,
        [(b"acme", orjson.dumps(forged))] * 2,  # and redelivered: one event
    )
    result = await _reconcile(settings)
    forged_day = forged_at.astimezone(UTC).date()
    first = result.differences[0]
    assert (first.customer_id, first.day, first.package) == ("acme", forged_day, "none")
    assert (first.topic, first.report) == (4, 3)
    assert all(d.topic == d.report + 1 for d in result.differences)
    assert {d.day for d in result.differences} == _days(forged_day, LAST_DAY)
    assert result.fold.duplicates == 1
    status, out, _ = await _cli(settings)
    assert status == 8
    assert f"acme      {forged_day}  none" in out


async def test_bad_arguments_and_an_unknown_customer_are_refused(
    services: Services, settings: Settings
) -> None:
    environment = settings_environment(settings)
    half = await asyncio.to_thread(run_cli, environment, "reconcile", "--from", "2026-12-01")
    assert half.returncode == 2
    assert "give both --from and --to" in half.stderr
    backwards = await asyncio.to_thread(
        run_cli, environment, "reconcile", "--from", "2026-12-02", "--to", "2026-12-01"
    )
    assert backwards.returncode == 2
    assert "--to is before --from" in backwards.stderr
    zoneless = await asyncio.to_thread(
        run_cli, environment, "reconcile", "--from", "2026-12-01T00:00:00", "--to", "2026-12-02"
    )
    assert zoneless.returncode == 2
    unknown = await _cli(settings, "--customer", "nobody")
    assert unknown[0] == 1
    assert "no customer 'nobody'" in unknown[2]


def _days(first: date, last: date) -> set[date]:
    return {first + timedelta(days=n) for n in range((last - first).days + 1)}

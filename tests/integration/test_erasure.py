"""Erasure on request, legal holds and the purge of devices without a user, against the real
broker and database (issue 14, part 5)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from tests.integration.license_support import (
    ALICE_DEVICES,
    KIOSK,
    billing_view,
    columns_containing,
    day,
    ingest,
    publish_outbox,
    send,
    sweep,
)
from tests.support import Services, fetch, fetchval, make_settings, run_cli, settings_environment
from worker.clock import FixedClock
from worker.db.repository import Repository
from worker.kafka.clients import ensure_topics
from worker.licensing.erasure_rules import ErasureTarget, Receipt, Scope
from worker.licensing.erasures import (
    Erasures,
    InvalidReason,
    SubjectOnHold,
    UnknownSubject,
)
from worker.settings import Settings
from worker.sim.fleet import SimulatedDevice

pytestmark = pytest.mark.integration

ALICE = "alice@acme.example"
BOB_LAPTOP = SimulatedDevice("acme", "bob-laptop", "bob@acme.example", "business")
GLOBEX = SimulatedDevice("globex", "globex-laptop", "carol@globex.example", "business")


@pytest.fixture
def settings(services: Services, database_url: str, topics: dict[str, str]) -> Settings:
    return make_settings(
        services, database_url, topics, sweep_enabled=False, relay_poll_seconds=0.1
    )


def alice_values() -> list[str]:
    """Every personal value of Alice: her id (her e-mail), display name, host names."""
    return [ALICE, f"User {ALICE}", *(f"host-{d.device_id}" for d in ALICE_DEVICES)]


async def fleet(services: Services, settings: Settings, devices: list[SimulatedDevice]) -> None:
    """The devices installed on day 0, a heartbeat 5 minutes later, licenses published."""
    events = [(d, "install", day(0)) for d in devices]
    events += [(d, "heartbeat", day(0) + timedelta(minutes=5)) for d in devices]
    await ingest(
        services, settings, day(0) + timedelta(minutes=10), await send(services, settings, events)
    )
    await publish_outbox(settings)


async def erase(
    settings: Settings,
    scope: str,
    subject: str,
    customer: str | None = "acme",
    at: datetime | None = None,
) -> Receipt:
    async with erasures(settings, at) as service:
        target = ErasureTarget.of(Scope(scope), subject, customer if scope != "customer" else None)
        return await service.erase(target, "ticket GDPR-42", wait_seconds=30)


@contextlib.asynccontextmanager
async def erasures(settings: Settings, at: datetime | None = None) -> AsyncIterator[Erasures]:
    """An Erasures service on its own pool, the clock at `at` (day 1)."""
    repository = await Repository.connect(settings.database_url.get_secret_value(), 2)
    clock = FixedClock(at or day(1))
    try:
        yield Erasures(settings, repository, clock, lambda: publish_outbox(settings))
    finally:
        await repository.close()


async def assert_absent(services: Services, settings: Settings, values: list[str]) -> None:
    url = services.superuser_url(settings.database_url.get_secret_value())
    for value in values:
        assert await columns_containing(url, value) == [], value


async def events_of(services: Services, settings: Settings, expected: int) -> list[dict[str, Any]]:
    return await billing_view(services, settings, expected)


async def test_user_erasure_releases_then_erases_and_leaves_no_trace(
    services: Services, settings: Settings
) -> None:
    await fleet(services, settings, [*ALICE_DEVICES, KIOSK])
    url = services.superuser_url(settings.database_url.get_secret_value())
    assert await columns_containing(url, ALICE), "the search finds what is there"

    receipt = await erase(settings, "user", ALICE)

    await assert_absent(services, settings, alice_values())
    events = await events_of(services, settings, 3 + 3)
    after = events[3:]
    # Billing first learns of the releases under the id it knows, then of the erasure.
    assert [(e["type"], e["subject_id"], e["reason"], e.get("sequence")) for e in after] == [
        ("license.released", "alice-watch", "erasure_requested", 2),
        ("license.released", ALICE, "erasure_requested", 2),
        ("user.erased", after[2]["subject_id"], "erasure_requested", None),
    ]
    assert after[2]["subject_id"].startswith("purged-")
    # The receipt: what was removed, when, by whom, and a keyed hash of the identifier.
    key = settings.required_pseudonym_key()
    expected_hash = hmac.new(
        key.encode(), "\x00".join(("erasure", "user", "acme", ALICE)).encode(), hashlib.sha256
    ).hexdigest()
    assert receipt.subject_hash == f"hmac-sha256:{expected_hash}"
    assert receipt.subject_hash != "hmac-sha256:" + hashlib.sha256(ALICE.encode()).hexdigest()
    assert receipt.removed == {
        "users": 1,
        "devices": 4,
        "device_history": 4,
        "licenses": 1,
        "license_history": 2,
        "license_outbox": 2,
    }
    assert receipt.requested_by == await fetchval(
        settings.database_url.get_secret_value(), "SELECT session_user"
    )
    [audit] = await fetch(url, "SELECT * FROM erasure_audit")
    assert (audit["action"], audit["scope"], audit["subject_hash"], audit["rows_removed"]) == (
        "erased",
        "user",
        receipt.subject_hash,
        14,
    )
    assert orjson.loads(audit["removed"]) == receipt.removed
    assert audit["note"] == "ticket GDPR-42"
    # Her devices belong to nobody now; the kiosk is untouched.
    owners = await fetch(url, "SELECT device_id, user_id FROM devices ORDER BY device_id")
    assert {row["user_id"] for row in owners} == {None}
    # The device history names her by the pseudonym until the erasure, nobody from then on.
    history = await fetch(
        url,
        "SELECT device_id, user_id, recorded_at FROM device_history "
        "WHERE device_id <> 'kiosk-1' ORDER BY device_id, id",
    )
    assert len(history) == 8
    for before, after in zip(history[::2], history[1::2], strict=True):
        assert before["user_id"].startswith("purged-")
        assert (after["user_id"], after["recorded_at"]) == (None, day(1))
    assert await fetchval(url, "SELECT hostname FROM devices WHERE device_id = 'kiosk-1'")


async def test_device_erasure_ends_its_license_and_its_user_follows_the_rules(
    services: Services, settings: Settings
) -> None:
    await fleet(services, settings, [*ALICE_DEVICES, KIOSK])
    kiosk = await erase(settings, "device", "kiosk-1")
    watch = await erase(settings, "device", "alice-watch")

    await assert_absent(services, settings, ["host-kiosk-1", "host-alice-watch"])
    events = await events_of(services, settings, 3 + 4)
    assert [(e["type"], e["subject_id"], e["reason"]) for e in events[3:]] == [
        ("license.released", "kiosk-1", "erasure_requested"),
        ("device.erased", "kiosk-1", "erasure_requested"),
        ("license.released", "alice-watch", "erasure_requested"),
        ("device.erased", "alice-watch", "erasure_requested"),
    ]
    assert kiosk.removed == watch.removed == {"devices": 1}
    url = services.superuser_url(settings.database_url.get_secret_value())
    # Alice keeps her license through her other devices; the watch is no longer hers.
    assert await fetchval(
        url, "SELECT active FROM licenses WHERE subject_type = 'user' AND subject_id = $1", ALICE
    )
    assert (
        await fetchval(url, "SELECT user_id FROM devices WHERE device_id = 'alice-watch'") is None
    )
    # From the erasure on, an as-of report shows the watch without a user.
    watch = await fetch(
        url, "SELECT user_id FROM device_history WHERE device_id = 'alice-watch' ORDER BY id"
    )
    assert [row["user_id"] for row in watch] == [ALICE, None]
    assert await fetchval(url, "SELECT hostname FROM devices WHERE device_id = 'alice-laptop'")


async def test_customer_erasure_releases_everything_and_late_signals_do_not_bring_it_back(
    services: Services, settings: Settings
) -> None:
    await fleet(services, settings, [*ALICE_DEVICES, KIOSK, BOB_LAPTOP, GLOBEX])
    receipt = await erase(settings, "customer", "acme")

    acme_values = [*alice_values(), "host-kiosk-1", "bob@acme.example", "host-bob-laptop"]
    await assert_absent(services, settings, acme_values)
    events = await events_of(services, settings, 5 + 5)
    # Two customers, two partitions: billing reads each customer's events in order.
    acme = [e for e in events if e["customer_id"] == "acme"][4:]
    assert sorted((e["type"], e["subject_id"], e["reason"]) for e in acme) == sorted(
        [
            ("customer.erased", "acme", "erasure_requested"),
            ("license.released", ALICE, "erasure_requested"),
            ("license.released", "alice-watch", "erasure_requested"),
            ("license.released", "bob@acme.example", "erasure_requested"),
            ("license.released", "kiosk-1", "erasure_requested"),
        ]
    )
    assert acme[-1]["type"] == "customer.erased"
    assert receipt.removed["users"] == 2
    assert receipt.removed["customers"] == 1
    url = services.superuser_url(settings.database_url.get_secret_value())
    # Globex is untouched.
    assert await columns_containing(url, "carol@globex.example")

    # A late install of an erased customer's device brings nothing back.
    total = await send(
        services, settings, [(d, "install", day(0) + timedelta(hours=1)) for d in ALICE_DEVICES]
    )
    await ingest(services, settings, day(1), 10 + total)
    await assert_absent(services, settings, acme_values)
    row = await fetch(
        url, "SELECT status, name, erased_at FROM customers WHERE customer_id = 'acme'"
    )
    assert (row[0]["status"], row[0]["name"], row[0]["erased_at"] is not None) == (
        "inactive",
        None,
        True,
    )
    with pytest.raises(UnknownSubject, match="was erased"):
        await erase(settings, "customer", "acme")


async def test_a_hold_blocks_purge_and_erasure_until_lifted(
    services: Services, settings: Settings
) -> None:
    await fleet(services, settings, [*ALICE_DEVICES, BOB_LAPTOP])
    target = ErasureTarget.of(Scope.USER, ALICE, "acme")
    async with erasures(settings) as service:
        held = await service.set_hold(target, "litigation L-7")
    assert (held.action, held.removed) == ("hold_set", {})

    await sweep(settings, day(31))
    purged = await sweep(settings, day(125))
    assert purged.purged == 1, "Bob is purged, Alice is held"
    url = services.superuser_url(settings.database_url.get_secret_value())
    assert await columns_containing(url, ALICE)
    assert not await columns_containing(url, "bob@acme.example")
    with pytest.raises(SubjectOnHold):
        await erase(settings, "user", ALICE)

    async with erasures(settings) as service:
        lifted = await service.lift_hold(target, "litigation L-7 closed")
    assert lifted.action == "hold_lifted"
    after = await sweep(settings, day(125) + timedelta(hours=1))
    assert after.purged == 1
    await assert_absent(services, settings, alice_values())
    audit = await fetch(url, "SELECT action, requested_by, note FROM erasure_audit ORDER BY id")
    session_user = await fetchval(settings.database_url.get_secret_value(), "SELECT session_user")
    assert [(a["action"], a["requested_by"]) for a in audit] == [
        ("hold_set", session_user),
        ("hold_lifted", session_user),
    ]


async def test_a_customer_hold_blocks_erasing_its_users(
    services: Services, settings: Settings
) -> None:
    await fleet(services, settings, [*ALICE_DEVICES])
    customer = ErasureTarget.of(Scope.CUSTOMER, "acme", None)
    async with erasures(settings) as service:
        await service.set_hold(customer, "audit A-1")
    for scope, subject in (("user", ALICE), ("device", "alice-laptop"), ("customer", "acme")):
        with pytest.raises(SubjectOnHold):
            await erase(settings, scope, subject)
    url = services.superuser_url(settings.database_url.get_secret_value())
    assert await fetchval(url, "SELECT count(*) FROM licenses WHERE active") == 2, (
        "nothing released"
    )
    async with erasures(settings) as service:
        await service.lift_hold(customer, "audit A-1 done")
    await erase(settings, "user", ALICE)
    await assert_absent(services, settings, alice_values())


async def test_unknown_ids_and_a_reason_naming_the_person_are_refused(
    services: Services, settings: Settings
) -> None:
    await fleet(services, settings, [*ALICE_DEVICES])
    for scope, subject in (
        ("user", "nobody@acme.example"),
        ("device", "no-device"),
        ("customer", "nope"),
    ):
        with pytest.raises(UnknownSubject):
            await erase(settings, scope, subject)
    async with erasures(settings) as service:
        target = ErasureTarget.of(Scope.USER, ALICE, "acme")
        for reason in (
            f"request from {ALICE.upper()}",
            "asked by User alice@acme.example",
            "host-alice-phone",
        ):
            with pytest.raises(InvalidReason):
                await service.erase(target, reason, wait_seconds=5)
    url = services.superuser_url(settings.database_url.get_secret_value())
    assert await fetchval(url, "SELECT count(*) FROM licenses WHERE active") == 2
    assert await fetchval(url, "SELECT count(*) FROM erasure_audit") == 0


async def test_devices_without_user_lose_their_host_name_at_the_retention(
    services: Services, settings: Settings
) -> None:
    await fleet(services, settings, [*ALICE_DEVICES, KIOSK])
    url = services.superuser_url(settings.database_url.get_secret_value())
    await sweep(settings, day(31))  # released: last signal + 30 days
    early = await sweep(settings, day(120))  # 89 days after the release
    assert early.purged_devices == 0
    assert await fetchval(url, "SELECT hostname FROM devices WHERE device_id = 'kiosk-1'")
    due = await sweep(settings, day(121))
    assert due.purged_devices == 1
    await assert_absent(services, settings, ["host-kiosk-1", *alice_values()])


async def test_create_topics_gives_the_dlq_a_retention(
    services: Services, settings: Settings
) -> None:
    suffix = settings.dlq_topic.rsplit(".", 1)[-1]
    fresh = settings.model_copy(
        update={
            "dlq_topic": f"dlq.retention.{suffix}",
            "license_events_topic": f"license.retention.{suffix}",
            "dlq_retention_days": 3,
        }
    )
    created = await ensure_topics(fresh, 1, 1)
    assert fresh.dlq_topic in created
    configs = await topic_configs(services, fresh.dlq_topic)
    assert configs["retention.ms"] == str(3 * 24 * 3600 * 1000)
    assert Settings.model_fields["dlq_retention_days"].default == 7


async def topic_configs(services: Services, topic: str) -> dict[str, str]:
    """The topic's configuration as the broker describes it (once it knows the new topic)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=services.kafka_bootstrap_servers)
    await admin.start()
    try:
        for _ in range(50):
            [response] = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, topic)]
            )
            error_code, _, _, _, entries = response.resources[0]
            if error_code == 0:
                return {entry[0]: entry[1] for entry in entries}
            await asyncio.sleep(0.2)
    finally:
        await admin.close()
    raise AssertionError(f"the broker does not describe {topic}")


async def test_erasure_and_a_concurrent_sweep_both_finish_without_deadlock(
    services: Services, settings: Settings
) -> None:
    await fleet(services, settings, [*ALICE_DEVICES, KIOSK, BOB_LAPTOP])
    await sweep(settings, day(31))
    # Alice comes back on day 100 (licensed again); Bob and the kiosk stay silent.
    back = await send(services, settings, [(ALICE_DEVICES[0], "heartbeat", day(100))])
    await ingest(services, settings, day(100) + timedelta(minutes=10), 12 + back)
    await publish_outbox(settings)
    url = services.superuser_url(settings.database_url.get_secret_value())
    deadlocks = "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
    before = await fetchval(url, deadlocks)
    # The sweep purges Bob and the kiosk's host name while the erasure releases and
    # purges Alice, on the same customer.
    report, receipt = await asyncio.gather(
        sweep(settings, day(125)), erase(settings, "user", ALICE, at=day(125))
    )
    assert receipt.action == "erased"
    leftover = await sweep(settings, day(125) + timedelta(hours=1))
    assert report.purged + leftover.purged == 1, "Bob, by one of the two passes"
    assert report.purged_devices + leftover.purged_devices == 1, "the kiosk"
    await assert_absent(services, settings, [*alice_values(), "bob@acme.example", "host-kiosk-1"])
    assert await fetchval(url, deadlocks) == before


async def test_the_commands_print_the_receipt_and_exit_by_outcome(
    services: Services, settings: Settings
) -> None:
    await fleet(services, settings, [*ALICE_DEVICES])
    environment = settings_environment(settings)
    reason = ["--reason", "ticket GDPR-43"]

    unknown = run_cli(
        environment, "erase", "user", "nobody@acme.example", "--customer", "acme", *reason
    )
    assert unknown.returncode == 4, unknown.stderr
    assert "no such user" in unknown.stderr
    held = run_cli(environment, "hold", "customer", "acme", *reason)
    assert held.returncode == 0, held.stderr
    assert orjson.loads(held.stdout)["action"] == "hold_set"
    refused = run_cli(environment, "erase", "user", ALICE, "--customer", "acme", *reason)
    assert refused.returncode == 5
    assert "legal hold" in refused.stderr
    assert run_cli(environment, "release-hold", "customer", "acme", *reason).returncode == 0
    named = run_cli(environment, "erase", "user", ALICE, "--customer", "acme", "--reason", ALICE)
    assert named.returncode == 2
    done = run_cli(environment, "erase", "user", ALICE, "--customer", "acme", *reason)
    assert done.returncode == 0, done.stderr
    receipt = orjson.loads(done.stdout)
    assert (receipt["action"], receipt["scope"], receipt["customer_id"]) == (
        "erased",
        "user",
        "acme",
    )
    assert receipt["subject_hash"].startswith("hmac-sha256:")
    assert receipt["events"] == ["user.erased"]
    assert receipt["rows_removed"] == sum(receipt["removed"].values()) > 0
    assert ALICE not in done.stdout + done.stderr
    await assert_absent(services, settings, alice_values())

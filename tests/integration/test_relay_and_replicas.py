"""Exactly once for billing across a relay crash, and one sweeper among several replicas."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest

from tests.integration.license_support import (
    ALICE_DEVICES,
    KIOSK,
    billing_view,
    day,
    ingest,
    publish_outbox,
    send,
)
from tests.support import (
    REPO_ROOT,
    Services,
    WorkerProcess,
    fetchval,
    make_settings,
    read_all,
    settings_environment,
    wait_until,
)

pytestmark = pytest.mark.integration

LEASE_SECONDS = 2.0


async def test_relay_killed_between_publish_and_mark_is_seen_once_by_billing(
    services: Services, database_url: str, topics: dict[str, str]
) -> None:
    settings = make_settings(
        services,
        database_url,
        topics,
        sweep_enabled=False,
        relay_enabled=False,
        leader_lease_seconds=LEASE_SECONDS,
    )
    devices = [*ALICE_DEVICES, KIOSK]
    total = await send(services, settings, [(d, "install", day(0)) for d in devices])
    await ingest(services, settings, day(0), total)
    pending = await fetchval(
        database_url, "SELECT count(*) FROM license_outbox WHERE published_at IS NULL"
    )
    assert pending == 3

    crashed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(Path(__file__).with_name("relay_crash.py"))],
        env=settings_environment(settings),
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert crashed.returncode == -9, crashed.stderr.decode()
    assert (
        await fetchval(
            database_url, "SELECT count(*) FROM license_outbox WHERE published_at IS NULL"
        )
        == 3
    )
    assert (
        len(
            await read_all(
                services.kafka_bootstrap_servers, settings.license_events_topic, 3, timeout=10
            )
        )
        == 3
    )

    # The killed relay's lease lapses (it never renews it again); then the restarted relay
    # publishes them again.
    await asyncio.sleep(LEASE_SECONDS + 0.2)
    assert await publish_outbox(settings) == 3
    raw = await read_all(services.kafka_bootstrap_servers, settings.license_events_topic, 6)
    ids = Counter(orjson.loads(record.value)["event_id"] for record in raw)
    assert len(raw) == 6
    assert set(ids.values()) == {2}, "only re-published duplicates, with equal ids"
    header_ids = {dict(record.headers)["event_id"].decode() for record in raw}
    assert header_ids == set(ids)
    billing = await billing_view(services, settings, 6)
    assert len(billing) == 3
    assert (
        await fetchval(
            database_url, "SELECT count(*) FROM license_outbox WHERE published_at IS NULL"
        )
        == 0
    )


async def test_two_run_processes_one_sweeps_and_the_other_takes_over(
    services: Services, database_url: str, topics: dict[str, str], tmp_path: Path
) -> None:
    settings = make_settings(
        services,
        database_url,
        topics,
        sweep_interval_seconds=0.3,
        leader_lease_seconds=LEASE_SECONDS,
    )
    first = WorkerProcess(settings, tmp_path / "first.log").start()
    second = WorkerProcess(settings, tmp_path / "second.log").start()
    try:

        async def one_leader_sweeping() -> bool:
            return any(w.log_text().count('"sweep.finished"') >= 3 for w in (first, second))

        await wait_until(one_leader_sweeping, timeout=60)
        leader, other = (
            (first, second) if '"sweep.finished"' in first.log_text() else (second, first)
        )
        assert '"sweep.finished"' not in other.log_text(), "only one replica sweeps"
        assert leader.log_text().count('"sweep.leader_elected"') == 1

        leader.kill()  # its lease lapses after LEASE_SECONDS, and the other takes it

        async def other_took_over() -> bool:
            return other.log_text().count('"sweep.finished"') >= 2

        await wait_until(other_took_over, timeout=60)
        assert '"sweep.leader_elected"' in other.log_text()
        assert other.terminate() == 0
    finally:
        for worker in (first, second):
            if worker.process is not None and worker.process.poll() is None:
                worker.kill()

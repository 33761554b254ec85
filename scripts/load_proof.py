#!/usr/bin/env python
"""Load proof: the real worker under a live fleet's load for a few minutes, its own metrics
scraped every second, and the picture an operator would look at (docs/load-proof.png and
docs/load-proof.csv).

    bash scripts/bench.sh --load-proof      # local services started and stopped for it

The load has three phases: steady (3,000 ev/s), a burst above what one worker drains
(20,000 ev/s), steady again. Lag in seconds should rise during the burst and come back to 0
after it; throughput should sit at the worker's ceiling while it catches up.
"""

from __future__ import annotations

import asyncio
import csv
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from worker.db.repository import Repository  # noqa: E402
from worker.db.sql_files import load_migrations  # noqa: E402
from worker.kafka.clients import AGENT_TOPIC_CONFIG  # noqa: E402
from worker.sim.fleet import agent_event, build_fleet, encode  # noqa: E402

PHASES = [("steady", 3_000, 60), ("burst", 20_000, 30), ("recovery", 3_000, 90)]
DOCS = REPO / "docs"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def fresh_database(base_url: str) -> str:
    name = f"load_proof_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(urlunsplit(urlsplit(base_url)._replace(path="/postgres")))
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    url = urlunsplit(urlsplit(base_url)._replace(path=f"/{name}"))
    repository = await Repository.connect(url, 1)
    await repository.apply_migrations(load_migrations())
    await repository.close()
    return url


async def fresh_topics(bootstrap: str, suffix: str) -> dict[str, str]:
    names = {
        "HEARTBEAT_TOPIC": f"load.heartbeat.{suffix}",
        "LIFECYCLE_TOPIC": f"load.lifecycle.{suffix}",
        "DLQ_TOPIC": f"load.dlq.{suffix}",
        "LICENSE_EVENTS_TOPIC": f"load.license.{suffix}",
    }
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    agent = {names["HEARTBEAT_TOPIC"], names["LIFECYCLE_TOPIC"]}
    await admin.create_topics(
        [
            NewTopic(n, 4, 1, topic_configs=AGENT_TOPIC_CONFIG if n in agent else {})
            for n in names.values()
        ]
    )
    await admin.close()
    return names


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    lag_seconds, lag_messages, processed = 0.0, 0.0, 0.0
    for line in text.splitlines():
        if line.startswith("license_worker_consumer_lag_seconds{"):
            lag_seconds = max(lag_seconds, float(line.rsplit(" ", 1)[1]))
        elif line.startswith("license_worker_consumer_lag_messages{"):
            lag_messages += float(line.rsplit(" ", 1)[1])
        elif line.startswith("license_worker_events_total{"):
            processed += float(line.rsplit(" ", 1)[1])
    return {"lag_seconds": lag_seconds, "lag_messages": lag_messages, "processed": processed}


async def produce(bootstrap: str, topic: str, sent: list[int]) -> None:
    fleet = build_fleet(customers=20, devices_per_customer=1000, seed=7)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=10, acks=1)
    await producer.start()
    try:
        index = 0
        for _, rate, seconds in PHASES:
            per_tick = rate // 10
            for _ in range(seconds * 10):
                tick = time.monotonic()
                now = datetime.now(UTC)
                for _ in range(per_tick):
                    device = fleet[index % len(fleet)]
                    index += 1
                    value = encode(agent_event(device, "heartbeat", now))
                    await producer.send(topic, value, key=device.key)
                sent[0] += per_tick
                await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))
        await producer.flush()
    finally:
        await producer.stop()


async def main() -> None:
    bootstrap, base_url = os.environ["KAFKA_BOOTSTRAP_SERVERS"], os.environ["DATABASE_URL"]
    database_url = await fresh_database(base_url)
    topics = await fresh_topics(bootstrap, uuid.uuid4().hex[:8])
    port = free_port()
    environment = {
        **os.environ,
        **topics,
        "DATABASE_URL": database_url,
        "CONSUMER_GROUP": f"load-{uuid.uuid4().hex[:8]}",
        "METRICS_PORT": str(port),
        "MONITOR_INTERVAL_SECONDS": "1",
        "SWEEP_ENABLED": "false",
        "UNKNOWN_CUSTOMERS": "admit",  # an agent-only fleet, no console
        "LOG_LEVEL": "warning",
        "LOG_FORMAT": "json",
    }
    worker = subprocess.Popen(  # noqa: ASYNC220 - started once, not awaited
        [str(REPO / ".venv/bin/license-worker"), "run"], env=environment, cwd=REPO
    )
    try:
        await asyncio.sleep(5)
        sent = [0]
        producing = asyncio.create_task(produce(bootstrap, topics["HEARTBEAT_TOPIC"], sent))
        rows = await sample_until_drained(port, sent, producing)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    write_outputs(rows)


async def sample_until_drained(
    port: int, sent: list[int], producing: asyncio.Task[None]
) -> list[dict[str, float]]:
    rows: list[dict[str, float]] = []
    started = time.monotonic()
    previous = await asyncio.to_thread(scrape, port)
    previous_sent, previous_at = 0, started
    while True:
        await asyncio.sleep(1)
        now = time.monotonic()
        current = await asyncio.to_thread(scrape, port)
        interval = now - previous_at
        rows.append(
            {
                "seconds": round(now - started, 1),
                "produced_per_second": (sent[0] - previous_sent) / interval,
                "stored_per_second": (current["processed"] - previous["processed"]) / interval,
                "lag_seconds": current["lag_seconds"],
                "lag_messages": current["lag_messages"],
            }
        )
        previous, previous_sent, previous_at = current, sent[0], now
        if producing.done() and current["lag_messages"] == 0 and rows[-1]["stored_per_second"] == 0:
            return rows


def write_outputs(rows: list[dict[str, float]]) -> None:
    with (DOCS / "load-proof.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    seconds = [row["seconds"] for row in rows]
    figure, (throughput, lag) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    throughput.plot(seconds, [r["produced_per_second"] for r in rows], label="produced (ev/s)")
    throughput.plot(
        seconds, [r["stored_per_second"] for r in rows], label="stored by the worker (ev/s)"
    )
    throughput.set_ylabel("events / s")
    throughput.legend(loc="upper right")
    throughput.set_title(
        "License worker under load: steady 3k/s, burst 20k/s for 30 s, steady 3k/s"
    )
    lag.plot(
        seconds, [r["lag_seconds"] for r in rows], color="tab:red", label="lag (s, broker time)"
    )
    lag.set_ylabel("lag seconds")
    lag.set_xlabel("seconds since the load started")
    messages = lag.twinx()
    messages.plot(
        seconds,
        [r["lag_messages"] for r in rows],
        color="tab:gray",
        linestyle="--",
        label="lag (messages)",
    )
    messages.set_ylabel("lag messages")
    lag.legend(loc="upper left")
    messages.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(DOCS / "load-proof.png", dpi=100)
    peak = max(rows, key=lambda r: r["lag_seconds"])
    print(
        f"peak lag {peak['lag_seconds']:.1f} s at {peak['seconds']} s; "
        f"max stored rate {max(r['stored_per_second'] for r in rows):,.0f} ev/s; "
        f"drained at {rows[-1]['seconds']} s; {len(rows)} samples"
    )


if __name__ == "__main__":
    asyncio.run(main())

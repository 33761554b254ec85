"""A running worker under a few thousand hostile messages mixed with valid ones.

Valid events carry tricky but legal ids (SQL text, quotes, separators, look-alike letters,
the longest allowed); the rest are fuzzed: hypothesis-generated documents, random bytes,
byte flips, truncations, wrong types, deep nesting, oversized values, tombstones. The decoder
is the oracle for which is which (it has its own tests); this test proves the pipeline
around it: every accepted event is stored exactly, every other message is in the DLQ with
the decoder's reason and its bytes unchanged, nothing else is stored, the offsets reach the
end, and the worker stays alive with bounded memory."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import (
    Services,
    WorkerProcess,
    committed_offsets_total,
    fetch,
    make_settings,
    produce,
    read_all,
    wait_until,
)
from worker.ingest.decoding import Rejection, decode_agent_event
from worker.settings import Settings

pytestmark = pytest.mark.integration

MAX_BYTES = 4096
VALID = 1200
FUZZED = 1800
RSS_GROWTH_LIMIT = 150 * 1024 * 1024
AT = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
TRICKY_IDS = [
    "'; DROP TABLE devices; --",
    "x' OR '1'='1",
    'quote"d',
    "back\\slash",
    "$1",
    "%s%n",
    "acme:dev",
    "a|b|c",
    "../etc",
    "\u0430cme",  # Cyrillic a
    "e\u0301",  # decomposed
    "\u00e9",  # composed
    "\ufb01le",
    "emoji-\U0001f600",
    "\u6771\u4eac",
    "inner space",
]
HOSTILE_CHARACTERS = ["\x00", "\u202e", "\u200b", "\x85", "\ufeff", "\n", "\u2028", "\x1b"]
WRONG_VALUES: list[Any] = [0, -1, 2**63, 1.5, True, None, [], {}, ["x"], {"a": "b"}, "x" * 5000]
BAD_TIMES: list[Any] = [1_700_000_000, "1700000000", "2026-01-01T00:00:00", "2026-13-01T00:00:00Z"]
BAD_TIMES += ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "1969-12-31T23:59:59Z"]
FIELDS = ["schema_version", "event_id", "type", "customer_id", "device_id", "user_id"]
FIELDS += ["occurred_at", "device_kind", "hostname", "os", "user", "agent_version"]


def base_event(number: int, rng: random.Random) -> dict[str, Any]:
    customer = rng.choice(TRICKY_IDS)
    device = f"{rng.choice(TRICKY_IDS)}-{number}"
    event_type = rng.choice(["heartbeat", "install", "uninstall"])
    event: dict[str, Any] = {
        "schema_version": 1,
        "event_id": f"evt-{number}",
        "type": event_type,
        "customer_id": customer,
        "device_id": device if number % 50 else device.rjust(200, "d")[:200],
        "user_id": rng.choice([None, f"{rng.choice(TRICKY_IDS)}@users-{number}"]),
        "occurred_at": (AT - timedelta(seconds=number)).isoformat(),
    }
    if event_type == "install":
        event.update(device_kind="personal", hostname=f"host {customer}", os="linux")
    return event


def fuzz(number: int, rng: random.Random, generated: list[Any]) -> bytes | None:
    event = base_event(number, rng)
    event["device_id"] = f"fz-{number}"
    encoded = orjson.dumps(event)
    kind = number % 12
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 300))
    if kind == 1:
        flipped = bytearray(encoded)
        for _ in range(rng.randrange(1, 5)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        return bytes(flipped)
    if kind == 2:
        return encoded[: rng.randrange(len(encoded))]
    if kind == 3:
        field = rng.choice(["event_id", "customer_id", "device_id", "hostname", "os"])
        event[field] = f"{event.get(field, '')}{rng.choice(HOSTILE_CHARACTERS)}x"
        return orjson.dumps(event)
    if kind == 4:
        event[rng.choice(FIELDS)] = rng.choice(WRONG_VALUES)
        return orjson.dumps(event)
    if kind == 5:
        depth = rng.choice([900, 1030, 2000])
        return encoded[:-1] + b',"nested":' + b"[" * depth + b"]" * depth + b"}"
    if kind == 6:
        return encoded[:-1] + b',"pad":"' + b"p" * rng.randrange(MAX_BYTES, 200_000) + b'"}'
    if kind == 7:
        event["occurred_at"] = rng.choice(BAD_TIMES)
        return orjson.dumps(event)
    if kind == 8:
        return encoded.replace(b'"\\u', b'"\\ud800\\u').replace(b'"evt-', b'"\\udc00evt-')
    if kind == 9:
        return None if number % 2 else b""
    if kind == 10:
        return encoded[:-1] + b',"device_id":"dup-' + str(number).encode() + b'"}'
    return orjson.dumps(generated[number % len(generated)])


def hypothesis_documents() -> list[Any]:
    """Documents from hypothesis, derandomized: a valid event with fields replaced by
    arbitrary JSON, hostile text included."""
    corpus: list[Any] = []
    text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=30)
    values = st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**63 - 1)
        | st.floats(allow_nan=False)
        | text,
        lambda children: (
            st.lists(children, max_size=3) | st.dictionaries(text, children, max_size=3)
        ),
        max_leaves=6,
    )

    @settings(
        max_examples=300,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(changes=st.dictionaries(st.sampled_from(FIELDS), values, max_size=3))
    def collect(changes: dict[str, Any]) -> None:
        event = base_event(len(corpus), random.Random(len(corpus)))
        event["device_id"] = f"hy-{len(corpus)}"
        corpus.append({**event, **changes})

    collect()
    return corpus


def corpus() -> list[bytes | None]:
    rng = random.Random(20261128)
    generated = hypothesis_documents()
    messages: list[bytes | None] = [orjson.dumps(base_event(n, rng)) for n in range(VALID)]
    messages += [fuzz(VALID + n, rng, generated) for n in range(FUZZED)]
    rng.shuffle(messages)
    return messages


@pytest.fixture
def settings_(services: Services, database_url: str, topics: dict[str, str]) -> Settings:
    return make_settings(
        services,
        database_url,
        topics,
        max_message_bytes=MAX_BYTES,
        batch_max_records=500,
        sweep_enabled=False,
    )


async def test_hostile_stream_ends_stored_or_dead_lettered_and_the_worker_survives(
    services: Services, settings_: Settings, database_url: str, tmp_path: Path
) -> None:
    settings = settings_
    messages = corpus()
    decoded = [decode_agent_event(value, MAX_BYTES) for value in messages]
    accepted = [event for event in decoded if not isinstance(event, Rejection)]
    assert 1000 < len(accepted) < len(messages) - 1000, "a real mix of good and bad"

    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    assert worker.process is not None
    process = psutil.Process(worker.process.pid)
    samples: list[int] = []

    async def sample_memory() -> None:
        while True:
            samples.append(process.memory_info().rss)
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample_memory())
    try:
        await asyncio.sleep(2)  # start-up: imports and clients, before the stream
        baseline = max(samples)
        keys = [f"k{n % 7}:{n}".encode() for n in range(len(messages))]
        total = await produce(
            services.kafka_bootstrap_servers,
            settings.lifecycle_topic,
            list(zip(keys, messages, strict=True)),
        )

        async def all_committed() -> bool:
            committed = await committed_offsets_total(
                services.kafka_bootstrap_servers, settings.consumer_group, settings.agent_topics
            )
            return committed == total

        await wait_until(all_committed, timeout=60)
        assert worker.process.poll() is None, "the worker is alive"
    finally:
        sampler.cancel()
        exit_code = worker.terminate()
    assert exit_code == 0, worker.log_text()[-3000:]
    assert max(samples) - baseline < RSS_GROWTH_LIMIT, (baseline, max(samples))

    rejected = {
        (key, value): result
        for key, value, result in zip(keys, messages, decoded, strict=True)
        if isinstance(result, Rejection)
    }
    letters = await read_all(services.kafka_bootstrap_servers, settings.dlq_topic, len(rejected))
    assert len(letters) == len(rejected), "input = stored + dead-lettered"
    for letter in letters:
        headers = dict(letter.headers)
        expected = rejected[(letter.key, letter.value)]
        assert headers["dlq.error.class"].decode() == expected.reason.value
        assert headers["dlq.source.topic"].decode() == settings.lifecycle_topic

    expected_devices: dict[tuple[str, str], list[Any]] = {}
    for event in accepted:
        expected_devices.setdefault((event.customer_id, event.device_id), []).append(event)
    rows = await fetch(
        database_url, "SELECT customer_id, device_id, user_id, last_seen_at FROM devices"
    )
    stored = {(row["customer_id"], row["device_id"]): row for row in rows}
    assert set(stored) == set(expected_devices), "every accepted event stored, nothing else"
    for key, events in expected_devices.items():
        assert stored[key]["last_seen_at"] == max(event.occurred_at for event in events), key
        if len(events) > 1:
            continue  # a fuzzed id that met another: the merge rules have their own tests
        [event] = events
        names_user = event.type != "uninstall" and event.names_user
        assert stored[key]["user_id"] == (event.user_id if names_user else None), key

"""The worker's decoding of agent messages against pydantic validating the bytes directly.

The worker parses each message with orjson, then validates the dict with the schema's
pydantic validator (`worker.ingest.decoding`). pydantic can also parse and validate JSON bytes in
one call (`validate_json`). This times both on the live shape's messages (heartbeats and
installs of a simulated fleet), alternating rounds in one process, and reports the median
µs per message of each and their ratio. No Kafka or Postgres.

    .venv/bin/python scripts/bench_decode.py [--rounds 9]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from schemas import AGENT_EVENT_ADAPTER
from worker.ingest.decoding import decode_agent_event
from worker.sim.fleet import agent_event, build_fleet, encode

MAX_BYTES = 65_536


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    arguments = parser.parse_args()

    at = datetime.now(UTC).replace(microsecond=0)
    fleet = build_fleet(5, 1_000)
    messages = [encode(agent_event(device, "heartbeat", at)) for device in fleet] * 7 + [
        encode(agent_event(device, "install", at)) for device in fleet
    ]
    validator = AGENT_EVENT_ADAPTER.validator

    def worker_decoder() -> None:
        for message in messages:
            decode_agent_event(message, MAX_BYTES)

    def orjson_then_validate() -> None:
        for message in messages:
            validator.validate_python(orjson.loads(message))

    def validate_json() -> None:
        for message in messages:
            validator.validate_json(message)

    candidates: dict[str, Callable[[], None]] = {
        "worker decoder (decode_agent_event)": worker_decoder,
        "orjson.loads + validate_python": orjson_then_validate,
        "pydantic validate_json": validate_json,
    }
    results: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(arguments.rounds):
        for name, candidate in candidates.items():
            started = time.perf_counter()
            candidate()
            results[name].append((time.perf_counter() - started) / len(messages) * 1e6)
    medians = {name: statistics.median(values) for name, values in results.items()}
    for name, values in results.items():
        runs = ", ".join(f"{value:.2f}" for value in values)
        print(f"{name:38} median {medians[name]:.2f} µs/message  (runs: {runs})")
    ratio = medians["orjson.loads + validate_python"] / medians["pydantic validate_json"]
    print(f"orjson + validate_python / validate_json: {ratio:.2f}")


if __name__ == "__main__":
    main()

"""Garbage-collector settings against the worker's per-batch Python work, in one process.

Decodes and folds 5,000-heartbeat batches (the live shape of `scripts/bench/shapes.py`: each
device once) with a few earlier batches kept alive, as the worker does, alternating between
Python's default collector thresholds and the worker's (`worker.service.
tune_garbage_collection`), and reports the mean µs per message of each and their ratio.
No Kafka or Postgres: this isolates what the collector costs the worker's own thread.

    .venv/bin/python scripts/bench_gc.py [--rounds 10] [--batches 20]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiokafka.structs import ConsumerRecord

from worker.ingest.batch import decode_batch
from worker.ingest.coalesce import coalesce
from worker.service import tune_garbage_collection
from worker.sim.fleet import agent_event, build_fleet, encode

BATCH = 5000
KEPT_ALIVE = 3  # the batch being written, the one being decoded, one more
DEFAULT_THRESHOLDS = (700, 10, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batches", type=int, default=20, help="batches per measurement")
    arguments = parser.parse_args()

    at = datetime.now(UTC).replace(microsecond=0)
    records = {
        ("agent.heartbeat.v1", 0): [
            ConsumerRecord(
                "agent.heartbeat.v1", 0, offset, 0, 0, device.key,
                encode(agent_event(device, "heartbeat", at)), None, 0, 0, [],
            )
            for offset, device in enumerate(build_fleet(5, BATCH // 5))
        ]
    }  # fmt: skip
    alive: list[object] = []

    def per_message_us() -> float:
        started = time.perf_counter()
        for _ in range(arguments.batches):
            batch = decode_batch(records, 65_536)
            alive.append((batch, coalesce((i.event for i in batch.good), at, timedelta(0))))
            del alive[:-KEPT_ALIVE]
        return (time.perf_counter() - started) / (arguments.batches * BATCH) * 1e6

    results: dict[str, list[float]] = {"default": [], "tuned": []}
    for _ in range(arguments.rounds):
        gc.unfreeze()
        gc.set_threshold(*DEFAULT_THRESHOLDS)
        results["default"].append(per_message_us())
        tune_garbage_collection()
        results["tuned"].append(per_message_us())
    medians = {name: statistics.median(values) for name, values in results.items()}
    for name, values in results.items():
        runs = ", ".join(f"{value:.2f}" for value in values)
        print(f"{name:8} median {medians[name]:.2f} µs/message  (runs: {runs})")
    print(f"default / tuned: {medians['default'] / medians['tuned']:.2f}")


if __name__ == "__main__":
    main()

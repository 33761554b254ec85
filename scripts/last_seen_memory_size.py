"""Bytes per device of the last-seen memory (`worker.ingest.last_seen_memory`), in one process.

Remembers `--devices` devices (ids like the benchmark fleet's, or longer with `--id-length`),
then keeps back one heartbeat of each (the steady state: every device has a pending change),
and prints what tracemalloc counts per device and how much the process's RSS grew. No Kafka
or Postgres. docs/ingestion.md, "Last-seen precision", quotes its figures.

    .venv/bin/python scripts/last_seen_memory_size.py [--devices 1000000] [--id-length 36]
"""

from __future__ import annotations

import argparse
import gc
import sys
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.ingest.coalesce import BatchChanges, DeviceChange
from worker.ingest.last_seen_memory import (
    LastSeenMemory,
    Remembered,
    keep_back_unchanged,
)

BATCH = 5_000
PRECISION = timedelta(minutes=15)


def fill(devices: int, id_length: int, customers: int) -> LastSeenMemory:
    start = datetime(2026, 12, 1, tzinfo=UTC)
    later = start + timedelta(minutes=5)
    memory = LastSeenMemory(devices)
    for first in range(0, devices, BATCH):
        changes = BatchChanges()
        for number in range(first, min(first + BATCH, devices)):
            customer = f"customer-{number % customers:05d}"
            device = f"dev-{number:08d}".ljust(id_length, "x")
            user = None if number % 10 == 9 else f"user-{number // 3:06d}@{customer}.example"
            memory.remember(
                (customer, device),
                Remembered(start, user, "business", "5.3.1", True),
                memory.generation,
            )
            change = DeviceChange(customer, device, later, later, later)
            if user is None:
                change.unattributed_seen_at = later
            else:
                change.user_id, change.user_reported_at = user, later
            changes.devices[(customer, device)] = change
        keep_back_unchanged(changes, memory, PRECISION)
    return memory


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1_000_000)
    parser.add_argument("--id-length", type=int, default=10, help="characters of a device id")
    parser.add_argument("--customers", type=int, default=100)
    parser.add_argument("--no-tracemalloc", action="store_true", help="RSS only (faster)")
    args = parser.parse_args()
    process = psutil.Process()
    gc.collect()
    rss_before = process.memory_info().rss
    if not args.no_tracemalloc:
        tracemalloc.start()
    memory = fill(args.devices, args.id_length, args.customers)
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] if not args.no_tracemalloc else None
    rss_grown = process.memory_info().rss - rss_before
    print(f"devices remembered: {len(memory):,} (device ids of {args.id_length} characters)")
    if traced is not None:
        print(f"tracemalloc: {traced / 1e6:.1f} MB, {traced / len(memory):.0f} bytes per device")
    print(f"RSS grown: {rss_grown / 1e6:.1f} MB, {rss_grown / len(memory):.0f} bytes per device")


if __name__ == "__main__":
    main()

"""Prometheus metrics of the worker. Labels never carry customer, user or device ids."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

EVENTS = Counter(
    "license_worker_events_total",
    "Agent messages processed, by topic, event type and outcome.",
    ["topic", "type", "outcome"],
)
DEAD_LETTERS = Counter(
    "license_worker_dead_letters_total",
    "Messages sent to the DLQ, by source topic and reason.",
    ["topic", "reason"],
)
CLAMPED_EVENTS = Counter(
    "license_worker_clamped_events_total",
    "Events whose agent clock was in the future and whose event time was clamped.",
)
BATCH_SIZE = Histogram(
    "license_worker_batch_size",
    "Messages per consumed batch.",
    buckets=(1, 10, 50, 100, 500, 1000, 2500, 5000, 10000, 25000),
)
BATCH_WRITE_SECONDS = Histogram(
    "license_worker_batch_write_seconds",
    "Time to write one batch to Postgres, retries included.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
DATABASE_ERRORS = Counter(
    "license_worker_database_errors_total",
    "Failed database operations, by whether they are retried.",
    ["kind"],
)
KAFKA_ERRORS = Counter(
    "license_worker_kafka_errors_total",
    "Failed Kafka operations, by operation.",
    ["operation"],
)
REBALANCES = Counter(
    "license_worker_rebalances_total",
    "Partition revocations seen by this worker.",
)
LICENSE_CHANGES = Counter(
    "license_worker_license_changes_total",
    "License allocations, releases and basis changes, by subject type and reason.",
    ["change", "subject_type", "reason"],
)

"""Prometheus metrics of the worker. Labels never carry customer, user or device ids."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

from worker.ops.leader_gauges import LeaderGauge

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
DEAD_LETTERS_FAILED = Counter(
    "license_worker_dead_letters_failed_total",
    "Dead letters the DLQ refused for good, even truncated, by source topic and reason: "
    "logged (ingest.dead_letter_refused, with the error and the source offset) and skipped; the "
    "original stays in its source topic.",
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
HEARTBEATS_SKIPPED = Counter(
    "license_worker_heartbeats_skipped_total",
    "Heartbeats not written: they only moved their device's last seen forward by less than "
    "LAST_SEEN_PRECISION_SECONDS (docs/ingestion.md, 'Last-seen precision').",
)
LAST_SEEN_SKIPPING = Gauge(
    "license_worker_last_seen_skipping",
    "1 while this worker skips heartbeats within the last-seen precision; 0 while it writes "
    "every heartbeat (precision or memory set to 0, or the agent topics not co-partitioned "
    "and assigned together: see the ingest.writing_every_heartbeat warning).",
)
LICENSE_CHANGES = Counter(
    "license_worker_license_changes_total",
    "License allocations, releases and basis changes, by subject type and reason.",
    ["change", "subject_type", "reason"],
)
WITHDRAWN_ALLOCATIONS = Counter(
    "license_worker_withdrawn_allocations_total",
    "Allocations taken back within their settle window, never published: a decision about "
    "the same subject re-dated them or found them caused by arrival order alone.",
)
SWEEP_LAST_SUCCESS = Gauge(
    "license_worker_sweep_last_success_timestamp_seconds",
    "When the last sweep (not a dry run) finished, as a Unix time.",
)
SWEEP_DURATION = Histogram(
    "license_worker_sweep_duration_seconds",
    "Duration of sweeps.",
    buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600),
)
SWEEP_FAILURES = Counter("license_worker_sweep_failures_total", "Sweeps that raised an error.")
SWEEP_LAG_WAITS = Counter(
    "license_worker_sweep_lag_waits_total",
    "Sweeps that decided at an earlier time than now because ingestion was behind.",
)
SWEEP_INGESTION_LAG = LeaderGauge(
    "license_worker_sweep_ingestion_lag_seconds",
    "How far ingestion was behind at the sweeper leader's last pass (absent while it cannot "
    "be told: a partition never stored).",
)
SWEEP_HELD = Counter(
    "license_worker_sweep_held_customers_total",
    "Customers whose releases the outage guard held, counted per sweep.",
)
PURGES = Counter("license_worker_purged_users_total", "Users whose personal data was purged.")
OUTBOX_PUBLISHED = Counter(
    "license_worker_outbox_published_total", "License events published to Kafka."
)
OUTBOX_PRUNED = Counter(
    "license_worker_outbox_pruned_total",
    "Published license events deleted from the outbox past OUTBOX_RETENTION_DAYS.",
)
RELAY_FAILURES = Counter(
    "license_worker_relay_failures_total",
    "Failed relay passes, by kind: transient (Kafka or Postgres unavailable) or permanent "
    "(Kafka refuses the license events for good: too large, not authorised); both retried.",
    ["kind"],
)
OUTBOX_PENDING = LeaderGauge(
    "license_worker_outbox_pending",
    "License events not yet published (the relay leader's count after its last pass).",
)
OUTBOX_OLDEST_AGE = LeaderGauge(
    "license_worker_outbox_oldest_age_seconds",
    "Age of the oldest unpublished license event (the relay leader's, after its last pass).",
)
CONSUMER_LAG_MESSAGES = Gauge(
    "license_worker_consumer_lag_messages",
    "Messages of an assigned partition not yet stored: end offset minus committed offset. "
    "Labelled like kafka-lag-exporter (group, topic, partition).",
    ["group", "topic", "partition"],
)
CONSUMER_LAG_SECONDS = Gauge(
    "license_worker_consumer_lag_seconds",
    "While messages wait: now minus the broker timestamp of the last stored message; 0 when "
    "caught up; +Inf when nothing was ever stored.",
    ["group", "topic", "partition"],
)
STUCK_PARTITIONS = Gauge(
    "license_worker_stuck_partitions",
    "Assigned partitions with messages waiting whose committed offset has not moved.",
)
CONSUMER_RECREATIONS = Counter(
    "license_worker_consumer_recreations_total",
    "Times the Kafka consumer was recreated because a partition was stuck.",
)
TASK_RESTARTS = Counter(
    "license_worker_task_restarts_total",
    "Times a background task was run again after a Postgres or Kafka outage ended it.",
    ["task"],
)
LICENSES_ACTIVE = LeaderGauge(
    "license_worker_licenses_active",
    "Licenses in use, all customers together, by subject type and basis: the sweeper leader's "
    "count, from its election and after each pass.",
    ["subject_type", "basis"],
)
CUSTOMERS_LICENSED = LeaderGauge(
    "license_worker_customers_licensed",
    "Customers holding at least one license: the sweeper leader's count, from its election "
    "and after each pass.",
)
WAITING_FOR_CONSOLE = Gauge(
    "license_worker_waiting_for_console",
    "1 while an ingestion batch with signals of customers not in the database waits for the "
    "console's consumer group to apply every console message (CONSOLE_CATCH_UP_WAIT_SECONDS).",
)
PAUSED_PARTITIONS = Gauge(
    "license_worker_paused_partitions",
    "Partitions paused while the worker waits out a Kafka or Postgres outage.",
)


FAILURE_KINDS = ("transient", "permanent")
KAFKA_OPERATIONS = ("commit", "commit_refused", "dead_letter")


def initialise(topics: Iterable[str], reasons: Iterable[str]) -> None:
    """Every series an alert takes `rate()` or `increase()` of exists from the start, at 0:
    a counter that first appears at 1 shows no increase, so its first failure would not
    alert (and a dashboard would show "no data" rather than 0)."""
    reasons = list(reasons)
    for topic in topics:
        for reason in reasons:
            DEAD_LETTERS.labels(topic, reason)
            DEAD_LETTERS_FAILED.labels(topic, reason)
    for kind in FAILURE_KINDS:
        DATABASE_ERRORS.labels(kind)
        RELAY_FAILURES.labels(kind)
    for operation in KAFKA_OPERATIONS:
        KAFKA_ERRORS.labels(operation)

-- The outbox relay (worker/licensing/relay.py; its leadership is a lease, leases.sql): the
-- license events it publishes, and what `reconcile` compares with billing's view.

-- name: pending_license_events
-- The next events to publish as of $2 (the relay's clock): an allocation once settled, and
-- no event while an allocation of the same subject before it waits (a decision made on a
-- later clock, `sweep --now`, may follow an allocation the relay's clock has not settled).
-- Locked for the relay's transaction; rows a decision holds (an allocation it may withdraw)
-- are skipped and published on a later pass if they are still there.
SELECT o.id, o.event_id, o.customer_id, o.payload::text AS payload
FROM license_outbox AS o
WHERE o.published_at IS NULL AND (o.settles_at IS NULL OR o.settles_at <= $2::timestamptz)
  AND NOT EXISTS (
      SELECT FROM license_outbox AS waiting
      WHERE waiting.published_at IS NULL AND waiting.settles_at IS NOT NULL
        AND waiting.customer_id = o.customer_id AND waiting.subject_type = o.subject_type
        AND waiting.subject_id = o.subject_id AND waiting.id < o.id
  )
ORDER BY o.id
LIMIT $1
FOR UPDATE SKIP LOCKED;

-- name: mark_license_events_published
-- $2: the rows' customers (on Citus, only their shards: docs/scaling.md).
UPDATE license_outbox SET published_at = now()
WHERE customer_id = ANY($2::text[]) AND id = ANY($1::bigint[]);

-- name: outbox_backlog
-- Events due for publication (an allocation in its settle window is not late yet); the age
-- of an allocation counts from when it settled.
SELECT count(*) AS pending,
       coalesce(extract(epoch FROM now() - min(coalesce(settles_at, created_at))), 0)::float8
           AS oldest_age_seconds
FROM license_outbox
WHERE published_at IS NULL AND (settles_at IS NULL OR settles_at <= now());

-- name: licenses_to_reconcile
-- Every license of customer $1 (NULL: of every customer) that billing knows by its subject:
-- a purged user's row carries a pseudonym the topic never named.
SELECT customer_id, subject_type, subject_id, active, event_sequence
FROM licenses
WHERE purged_at IS NULL AND ($1::text IS NULL OR customer_id = $1)
ORDER BY customer_id, subject_type, subject_id;

-- name: subjects_with_pending_events
-- Subjects with license events the relay has not published yet.
SELECT DISTINCT customer_id, subject_type, subject_id
FROM license_outbox
WHERE published_at IS NULL AND subject_type IN ('user', 'device')
  AND ($1::text IS NULL OR customer_id = $1);

-- name: unpublished_license_decisions
-- `reconcile --from/--to`: per customer ($1: one, NULL: all), the earliest decision time of
-- a license event the relay has not published yet (the topic is incomplete from then on),
-- with the outbox's highest id (events written after it were decided after this read).
SELECT customer_id, min((payload->>'emitted_at')::timestamptz) AS decided_from,
       (SELECT coalesce(max(id), 0) FROM license_outbox) AS last_id
FROM license_outbox
WHERE published_at IS NULL
  AND payload->>'type' IN ('license.allocated', 'license.released', 'license.package_changed')
  AND ($1::text IS NULL OR customer_id = $1)
GROUP BY customer_id
UNION ALL
SELECT NULL, NULL, (SELECT coalesce(max(id), 0) FROM license_outbox);

-- name: license_decisions_written_after
-- Per customer ($1: one, NULL: all), the earliest decision time of a license event written
-- to the outbox after id $2 (during a `reconcile --from/--to`).
SELECT customer_id, min((payload->>'emitted_at')::timestamptz) AS decided_from
FROM license_outbox
WHERE id > $2
  AND payload->>'type' IN ('license.allocated', 'license.released', 'license.package_changed')
  AND ($1::text IS NULL OR customer_id = $1)
GROUP BY customer_id;

-- name: usage_snapshot_times
-- `reconcile --from/--to`: when the usage snapshots of the days $1..$2 were taken (of
-- customer $3, NULL: of all), so the report as of each is read on the same snapshot.
SELECT DISTINCT taken_at
FROM usage_snapshots
WHERE day BETWEEN $1 AND $2 AND ($3::text IS NULL OR customer_id = $3);

-- name: prune_published_license_events
-- Deletes up to $3 rows published before $1 - $2 (the relay's clock, OUTBOX_RETENTION_DAYS)
-- among the oldest rows by id, never an unpublished one: the worker has no DELETE on the
-- outbox, only this SECURITY DEFINER function (migration 0013). Returns the count deleted.
SELECT prune_published_license_events($1::timestamptz, $2::interval, $3::integer) AS pruned;

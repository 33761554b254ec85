-- The outbox relay (worker/licensing/relay.py): its cluster-wide lock, the license events
-- it publishes, and what `reconcile` compares with billing's view.

-- name: try_lock_relay
SELECT pg_try_advisory_lock(hashtext('license-telemetry:relay'));

-- name: unlock_relay
SELECT pg_advisory_unlock(hashtext('license-telemetry:relay'));

-- name: pending_license_events
SELECT id, event_id, customer_id, payload::text AS payload
FROM license_outbox
WHERE published_at IS NULL
ORDER BY id
LIMIT $1;

-- name: mark_license_events_published
UPDATE license_outbox SET published_at = now() WHERE id = ANY($1::bigint[]);

-- name: outbox_backlog
SELECT count(*) AS pending,
       coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_age_seconds
FROM license_outbox WHERE published_at IS NULL;

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

-- Every statement the worker runs, by name. worker/sql_files.py loads them; a block starts
-- with a line `-- name: <name>` and runs to the next one.

-- name: upsert_customers
-- $1: customer ids, sorted (a fixed lock order keeps concurrent workers out of deadlocks).
INSERT INTO customers (customer_id)
SELECT customer_id FROM unnest($1::text[]) AS batch (customer_id)
ON CONFLICT (customer_id) DO NOTHING;

-- name: upsert_users
INSERT INTO users AS u (
    customer_id, user_id, email, display_name, profile_reported_at, first_seen_at, last_seen_at
)
SELECT * FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[],
    $7::timestamptz[]
)
ON CONFLICT (customer_id, user_id) DO UPDATE SET
    email = CASE WHEN EXCLUDED.profile_reported_at >= coalesce(u.profile_reported_at, '-infinity')
                 THEN EXCLUDED.email ELSE u.email END,
    display_name = CASE WHEN EXCLUDED.profile_reported_at >= coalesce(u.profile_reported_at, '-infinity')
                        THEN EXCLUDED.display_name ELSE u.display_name END,
    profile_reported_at = greatest(u.profile_reported_at, EXCLUDED.profile_reported_at),
    first_seen_at = least(u.first_seen_at, EXCLUDED.first_seen_at),
    last_seen_at = greatest(u.last_seen_at, EXCLUDED.last_seen_at);

-- name: upsert_devices
INSERT INTO devices AS d (
    customer_id, device_id, user_id, user_reported_at, device_kind, kind_reported_at,
    hostname, os, details_reported_at, agent_version, agent_version_reported_at,
    first_seen_at, last_seen_at, last_present_at, last_installed_at, last_uninstalled_at
)
SELECT * FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::timestamptz[],
    $7::text[], $8::text[], $9::timestamptz[], $10::text[], $11::timestamptz[],
    $12::timestamptz[], $13::timestamptz[], $14::timestamptz[], $15::timestamptz[],
    $16::timestamptz[]
)
ON CONFLICT (customer_id, device_id) DO UPDATE SET
    user_id = CASE WHEN EXCLUDED.user_reported_at >= coalesce(d.user_reported_at, '-infinity')
                   THEN EXCLUDED.user_id ELSE d.user_id END,
    user_reported_at = greatest(d.user_reported_at, EXCLUDED.user_reported_at),
    device_kind = CASE WHEN EXCLUDED.kind_reported_at >= coalesce(d.kind_reported_at, '-infinity')
                       THEN EXCLUDED.device_kind ELSE d.device_kind END,
    kind_reported_at = greatest(d.kind_reported_at, EXCLUDED.kind_reported_at),
    hostname = CASE WHEN EXCLUDED.details_reported_at >= coalesce(d.details_reported_at, '-infinity')
                    THEN EXCLUDED.hostname ELSE d.hostname END,
    os = CASE WHEN EXCLUDED.details_reported_at >= coalesce(d.details_reported_at, '-infinity')
              THEN EXCLUDED.os ELSE d.os END,
    details_reported_at = greatest(d.details_reported_at, EXCLUDED.details_reported_at),
    agent_version = CASE WHEN EXCLUDED.agent_version_reported_at
                              >= coalesce(d.agent_version_reported_at, '-infinity')
                         THEN EXCLUDED.agent_version ELSE d.agent_version END,
    agent_version_reported_at = greatest(d.agent_version_reported_at,
                                         EXCLUDED.agent_version_reported_at),
    first_seen_at = least(d.first_seen_at, EXCLUDED.first_seen_at),
    last_seen_at = greatest(d.last_seen_at, EXCLUDED.last_seen_at),
    last_present_at = greatest(d.last_present_at, EXCLUDED.last_present_at),
    last_installed_at = greatest(d.last_installed_at, EXCLUDED.last_installed_at),
    last_uninstalled_at = greatest(d.last_uninstalled_at, EXCLUDED.last_uninstalled_at);

-- name: credit_device_users
-- Signals that did not name a user (uninstalls, heartbeats without user_id) count for the
-- device's current user. Runs after upsert_devices, so "current" includes this batch.
UPDATE users AS u
SET last_seen_at = batch.seen_at
FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS batch (customer_id, device_id, seen_at)
JOIN devices AS d USING (customer_id, device_id)
WHERE u.customer_id = d.customer_id
  AND u.user_id = d.user_id
  AND u.last_seen_at < batch.seen_at;

-- name: insert_lifecycle_events
INSERT INTO device_lifecycle_events (customer_id, event_id, device_id, event_type, occurred_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[])
ON CONFLICT (customer_id, event_id) DO NOTHING
RETURNING customer_id, event_id;

-- name: record_ingestion_progress
INSERT INTO ingestion_progress AS p (topic, partition, next_offset, last_message_at)
SELECT * FROM unnest($1::text[], $2::integer[], $3::bigint[], $4::timestamptz[])
ON CONFLICT (topic, partition) DO UPDATE SET
    next_offset = greatest(p.next_offset, EXCLUDED.next_offset),
    last_message_at = greatest(p.last_message_at, EXCLUDED.last_message_at),
    updated_at = now();

-- name: create_migrations_table
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: lock_migrations
-- Held for the whole migrate run, so two processes migrating at once apply each file once.
SELECT pg_advisory_lock(hashtext('license-telemetry:migrate'));

-- name: unlock_migrations
SELECT pg_advisory_unlock(hashtext('license-telemetry:migrate'));

-- name: applied_migrations
SELECT version, name, checksum FROM schema_migrations ORDER BY version;

-- name: record_migration
INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3);

-- name: summary
SELECT
    (SELECT count(*) FROM customers) AS customers,
    (SELECT count(*) FROM users) AS users,
    (SELECT count(*) FROM devices) AS devices,
    (SELECT count(*) FROM devices WHERE protected) AS protected_devices,
    (SELECT count(*) FROM devices WHERE NOT protected) AS uninstalled_devices,
    (SELECT count(*) FROM device_lifecycle_events) AS lifecycle_events,
    (SELECT max(last_seen_at) FROM devices) AS newest_signal_at,
    (SELECT max(last_message_at) FROM ingestion_progress) AS newest_message_stored_at;

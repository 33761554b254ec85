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
-- Returns the devices whose change can change a license: new, (un)installed, moved to
-- another user, kind changed, or heard from after having been silent past the window ($17).
-- `before` reads the rows as they were: every part of one statement sees the same snapshot.
WITH batch AS (
    SELECT * FROM unnest(
        $1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::timestamptz[],
        $7::text[], $8::text[], $9::timestamptz[], $10::text[], $11::timestamptz[],
        $12::timestamptz[], $13::timestamptz[], $14::timestamptz[], $15::timestamptz[],
        $16::timestamptz[]
    ) AS b (
        customer_id, device_id, user_id, user_reported_at, device_kind, kind_reported_at,
        hostname, os, details_reported_at, agent_version, agent_version_reported_at,
        first_seen_at, last_seen_at, last_present_at, last_installed_at, last_uninstalled_at
    )
),
before AS (
    SELECT d.customer_id, d.device_id, d.user_id, d.device_kind, d.protected, d.last_seen_at
    FROM devices AS d
    JOIN batch USING (customer_id, device_id)
    FOR UPDATE OF d
),
upserted AS (
    INSERT INTO devices AS d (
        customer_id, device_id, user_id, user_reported_at, device_kind, kind_reported_at,
        hostname, os, details_reported_at, agent_version, agent_version_reported_at,
        first_seen_at, last_seen_at, last_present_at, last_installed_at, last_uninstalled_at
    )
    SELECT * FROM batch
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
        last_uninstalled_at = greatest(d.last_uninstalled_at, EXCLUDED.last_uninstalled_at)
    RETURNING d.customer_id, d.device_id, d.user_id, d.device_kind, d.protected
)
SELECT u.customer_id, u.device_id, u.user_id, b.user_id AS previous_user_id
FROM upserted AS u
LEFT JOIN before AS b USING (customer_id, device_id)
WHERE b.device_id IS NULL
   OR u.protected IS DISTINCT FROM b.protected
   OR u.user_id IS DISTINCT FROM b.user_id
   OR u.device_kind IS DISTINCT FROM b.device_kind
   OR (u.protected AND b.last_seen_at < $17::timestamptz);

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

-- name: license_models
SELECT customer_id, license_model FROM customers WHERE customer_id = ANY($1::text[]);

-- name: lock_group_devices
-- Every device of the given users ($1, $2) and the given devices ($3, $4), locked in key
-- order: ingestion and the sweeper deciding the same user wait for each other.
SELECT d.customer_id, d.device_id, d.user_id, d.device_kind, d.protected, d.first_seen_at,
       d.last_seen_at, d.last_uninstalled_at
FROM devices AS d
WHERE (d.customer_id, d.user_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
   OR (d.customer_id, d.device_id) IN (SELECT * FROM unnest($3::text[], $4::text[]))
ORDER BY d.customer_id, d.device_id
FOR UPDATE;

-- name: held_licenses
SELECT l.customer_id, l.subject_type, l.subject_id, l.active, l.basis
FROM licenses AS l
JOIN unnest($1::text[], $2::text[], $3::text[]) AS s (customer_id, subject_type, subject_id)
    USING (customer_id, subject_type, subject_id)
WHERE l.purged_at IS NULL;

-- name: allocate_licenses
INSERT INTO licenses AS l (
    customer_id, subject_type, subject_id, active, basis, allocated_at, allocation_reason
)
SELECT c, t, s, true, b, a, r
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[])
    AS x (c, t, s, b, a, r)
ON CONFLICT (customer_id, subject_type, subject_id) DO UPDATE SET
    active = true,
    basis = EXCLUDED.basis,
    allocated_at = EXCLUDED.allocated_at,
    allocation_reason = EXCLUDED.allocation_reason,
    released_at = NULL,
    release_reason = NULL,
    updated_at = now();

-- name: release_licenses
UPDATE licenses AS l
SET active = false, released_at = x.released_at, release_reason = x.reason, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[])
    AS x (customer_id, subject_type, subject_id, released_at, reason)
WHERE l.customer_id = x.customer_id
  AND l.subject_type = x.subject_type
  AND l.subject_id = x.subject_id;

-- name: change_license_basis
UPDATE licenses AS l
SET basis = x.basis, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
    AS x (customer_id, subject_type, subject_id, basis)
WHERE l.customer_id = x.customer_id
  AND l.subject_type = x.subject_type
  AND l.subject_id = x.subject_id;

-- name: append_license_history
INSERT INTO license_history (
    customer_id, subject_type, subject_id, change, basis, reason, effective_at, decided_at,
    event_id
)
SELECT * FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
    $7::timestamptz[], $8::timestamptz[], $9::uuid[]
);

-- name: enqueue_license_events
INSERT INTO license_outbox (event_id, customer_id, subject_type, subject_id, payload)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[])
ON CONFLICT (event_id) DO NOTHING;

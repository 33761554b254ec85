-- Every statement the worker runs, by name. worker/sql_files.py loads them; a block starts
-- with a line `-- name: <name>` and runs to the next one.
--
-- Lock order (docs/licensing.md, "Concurrency"): every transaction takes its row locks in
-- this order of tables, and the rows of one table in key order, in one statement each:
--   customers (share; the console's changes: update), by customer_id
--   -> users, by (customer_id, user_id): a user's row is the lock of its license decision
--   -> devices, by (customer_id, device_id)
--   -> lifecycle events, ingestion progress (by topic, partition)
--   -> licenses, by (customer_id, subject_type, subject_id)
--   -> license history and outbox (appended; unique event ids).
-- Arrays handed to INSERT ... ON CONFLICT are sorted by the caller (rows are locked in array
-- order); UPDATE ... FROM unnest(...) only touches rows locked before, or locks them in a
-- sorted CTE. The purge skips what is locked (SKIP LOCKED) instead of waiting.

-- name: upsert_customers
-- $1: customer ids, sorted (a fixed lock order keeps concurrent workers out of deadlocks).
INSERT INTO customers (customer_id)
SELECT customer_id FROM unnest($1::text[]) AS batch (customer_id)
ON CONFLICT (customer_id) DO NOTHING;

-- name: share_customers
-- Taken before any device lock by every transaction that decides licenses (ingestion here,
-- customer_terms in every decision): it conflicts only with lock_customer, so a console
-- change (memberships, subscriptions, status) and a license decision for the same customer
-- never run at once and never miss each other's writes. $1 sorted.
SELECT customer_id FROM customers WHERE customer_id = ANY($1::text[])
ORDER BY customer_id
FOR SHARE;

-- name: lock_device_users
-- The users whose license a batch can change, locked in key order before any device: the
-- current users of the batch's devices ($1, $2) and the users the batch names ($3, $4).
-- Every decision about a user holds its row (lock_group_users), so two batches with
-- devices of the same user, or a batch and the sweeper, decide that user one after the
-- other, the later one seeing the earlier one's devices.
SELECT u.customer_id, u.user_id
FROM users AS u
WHERE (u.customer_id, u.user_id) IN (
    SELECT d.customer_id, d.user_id
    FROM devices AS d
    JOIN unnest($1::text[], $2::text[]) AS b (customer_id, device_id)
        USING (customer_id, device_id)
    WHERE d.user_id IS NOT NULL
    UNION ALL
    SELECT * FROM unnest($3::text[], $4::text[])
)
ORDER BY u.customer_id, u.user_id
FOR NO KEY UPDATE OF u;

-- name: lock_group_users
-- The users of a license decision ($1, $2), in key order, before their devices: see
-- lock_device_users.
SELECT u.customer_id, u.user_id
FROM users AS u
JOIN unnest($1::text[], $2::text[]) AS g (customer_id, user_id) USING (customer_id, user_id)
ORDER BY u.customer_id, u.user_id
FOR NO KEY UPDATE OF u;

-- name: lock_customer
-- A console change: waits for the decisions in progress for this customer (share_customers).
SELECT customer_id FROM customers WHERE customer_id = $1 FOR UPDATE;

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
-- another user, kind changed, first seen earlier (the covered devices are the earliest first
-- seen: a late, older event can move an over-allowance license), or heard from after having
-- been silent past the window ($17).
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
    -- No FOR UPDATE: locking every row first would write each tuple twice. Two replicas can
    -- write one device at once (its heartbeat and lifecycle partitions may be assigned to
    -- different consumers): for a device with a user, the user locks above make the later
    -- writer wait, so this snapshot is current; for one without, it can be older than the
    -- row the upsert updates (known gap: an xfail test in test_concurrent_writes.py).
    SELECT d.customer_id, d.device_id, d.user_id, d.device_kind, d.protected, d.first_seen_at,
           d.last_seen_at
    FROM devices AS d
    JOIN batch USING (customer_id, device_id)
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
    RETURNING d.customer_id, d.device_id, d.user_id, d.device_kind, d.protected, d.first_seen_at
)
SELECT u.customer_id, u.device_id, u.user_id, b.user_id AS previous_user_id
FROM upserted AS u
LEFT JOIN before AS b USING (customer_id, device_id)
WHERE b.device_id IS NULL
   OR u.protected IS DISTINCT FROM b.protected
   OR u.user_id IS DISTINCT FROM b.user_id
   OR u.device_kind IS DISTINCT FROM b.device_kind
   OR u.first_seen_at IS DISTINCT FROM b.first_seen_at
   OR (u.protected AND b.last_seen_at < $17::timestamptz);

-- name: credit_device_users
-- Signals that did not name a user (uninstalls, heartbeats without user_id) count for the
-- device's current user. Runs after upsert_devices, so "current" includes this batch. One
-- row per user, its devices' newest signal: UPDATE ... FROM applies only one of several
-- rows that match a target, and which one is arbitrary. The users are locked already
-- (lock_device_users).
WITH credited AS (
    SELECT d.customer_id, d.user_id, max(batch.seen_at) AS seen_at
    FROM unnest($1::text[], $2::text[], $3::timestamptz[])
        AS batch (customer_id, device_id, seen_at)
    JOIN devices AS d USING (customer_id, device_id)
    WHERE d.user_id IS NOT NULL
    GROUP BY d.customer_id, d.user_id
)
UPDATE users AS u
SET last_seen_at = c.seen_at
FROM credited AS c
WHERE u.customer_id = c.customer_id
  AND u.user_id = c.user_id
  AND u.last_seen_at < c.seen_at;

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

-- name: keep_migrations_table_private
-- The migrations' bookkeeping is the migrating role's alone: the default privileges of
-- sql/roles/create_roles.sql would otherwise let the worker role rewrite it.
DO $private$
DECLARE
    grantee_name text;
BEGIN
    FOR grantee_name IN
        SELECT DISTINCT r.rolname
        FROM pg_class AS c
        CROSS JOIN LATERAL aclexplode(c.relacl) AS a
        JOIN pg_roles AS r ON r.oid = a.grantee
        WHERE c.oid = 'schema_migrations'::regclass AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('REVOKE ALL ON schema_migrations FROM %I', grantee_name);
    END LOOP;
END
$private$;

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

-- name: customer_terms
-- What a license decision needs of its customers, share-locked like share_customers (and
-- taken before any device lock for the same reason). $1 sorted.
SELECT customer_id, license_model, status, status_changed_at
FROM customers
WHERE customer_id = ANY($1::text[])
ORDER BY customer_id
FOR SHARE;

-- name: live_subscriptions
SELECT customer_id, group_id, package
FROM subscriptions
WHERE customer_id = ANY($1::text[]) AND status IN ('in_trial', 'active');

-- name: group_memberships
SELECT m.customer_id, m.user_id, m.group_id
FROM group_members AS m
JOIN unnest($1::text[], $2::text[]) AS u (customer_id, user_id)
    ON m.customer_id = u.customer_id AND m.user_id = u.user_id
WHERE m.member;

-- name: lock_group_devices
-- Every device of the given users ($1, $2) and the given devices ($3, $4), locked in key
-- order: ingestion and the sweeper deciding the same user wait for each other.
SELECT d.customer_id, d.device_id, d.user_id, d.device_kind, d.protected, d.first_seen_at,
       d.last_seen_at, d.last_uninstalled_at, d.last_present_at
FROM devices AS d
WHERE (d.customer_id, d.device_id) IN (
    SELECT u.customer_id, u.device_id
    FROM devices AS u
    JOIN unnest($1::text[], $2::text[]) AS g (customer_id, user_id)
        ON u.customer_id = g.customer_id AND u.user_id = g.user_id
    UNION ALL
    SELECT * FROM unnest($3::text[], $4::text[])
)
ORDER BY d.customer_id, d.device_id
FOR UPDATE OF d;

-- name: held_licenses
-- Locked in key order: the writes of the decision (allocate, release, reattribute) then only
-- touch rows this transaction holds, or insert new ones in the same order.
SELECT l.customer_id, l.subject_type, l.subject_id, l.active, l.basis, l.package,
       l.event_sequence
FROM licenses AS l
JOIN unnest($1::text[], $2::text[], $3::text[]) AS s (customer_id, subject_type, subject_id)
    USING (customer_id, subject_type, subject_id)
WHERE l.purged_at IS NULL
ORDER BY l.customer_id, l.subject_type, l.subject_id
FOR UPDATE OF l;

-- name: allocate_licenses
-- $8 is the subject's event number of this allocation: the row is written only over the
-- state the decision was made from (number $8 - 1), so a decision raced by another one
-- writes nothing and the caller decides again. Returns the rows written.
INSERT INTO licenses AS l (
    customer_id, subject_type, subject_id, active, basis, allocated_at, allocation_reason,
    package, event_sequence
)
SELECT c, t, s, true, b, a, r, p, n
FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[], $7::text[],
    $8::integer[]
) AS x (c, t, s, b, a, r, p, n)
WHERE x.n = 1 OR EXISTS (
    SELECT FROM licenses AS held
    WHERE held.customer_id = x.c AND held.subject_type = x.t AND held.subject_id = x.s
)
ON CONFLICT (customer_id, subject_type, subject_id) DO UPDATE SET
    active = true,
    basis = EXCLUDED.basis,
    package = EXCLUDED.package,
    allocated_at = EXCLUDED.allocated_at,
    allocation_reason = EXCLUDED.allocation_reason,
    released_at = NULL,
    release_reason = NULL,
    event_sequence = EXCLUDED.event_sequence,
    updated_at = now()
WHERE l.event_sequence = EXCLUDED.event_sequence - 1
RETURNING 1;

-- name: release_licenses
-- $6 is the subject's event number of this release; written only over number $6 - 1 (see
-- allocate_licenses). Returns the rows written. One row per subject: a decision changes a
-- subject once (license_changes; checked by test_change_reasons), so no target has several
-- rows. Sorted, locked by held_licenses.
UPDATE licenses AS l
SET active = false, released_at = x.released_at, release_reason = x.reason,
    event_sequence = x.event_sequence, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::integer[])
    AS x (customer_id, subject_type, subject_id, released_at, reason, event_sequence)
WHERE l.customer_id = x.customer_id
  AND l.subject_type = x.subject_type
  AND l.subject_id = x.subject_id
  AND l.event_sequence = x.event_sequence - 1
RETURNING 1;

-- name: reattribute_licenses
-- A held license whose basis or package changed. One row per subject, as release_licenses.
UPDATE licenses AS l
SET basis = x.basis, package = x.package, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
    AS x (customer_id, subject_type, subject_id, basis, package)
WHERE l.customer_id = x.customer_id
  AND l.subject_type = x.subject_type
  AND l.subject_id = x.subject_id;

-- name: append_license_history
INSERT INTO license_history (
    customer_id, subject_type, subject_id, change, basis, reason, effective_at, package,
    decided_at, event_id
)
SELECT * FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
    $7::timestamptz[], $8::text[], $9::timestamptz[], $10::uuid[]
);

-- name: enqueue_license_events
INSERT INTO license_outbox (event_id, customer_id, subject_type, subject_id, payload)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[])
ON CONFLICT (event_id) DO NOTHING;

-- name: try_lock_sweeper
-- Session lock: released when the sweep ends or its connection dies, so a crashed
-- sweeper's work is picked up by the next replica that tries.
SELECT pg_try_advisory_lock(hashtext('license-telemetry:sweeper'));

-- name: unlock_sweeper
SELECT pg_advisory_unlock(hashtext('license-telemetry:sweeper'));

-- name: try_lock_relay
SELECT pg_try_advisory_lock(hashtext('license-telemetry:relay'));

-- name: unlock_relay
SELECT pg_advisory_unlock(hashtext('license-telemetry:relay'));

-- name: sweep_state
SELECT scanned_until, last_run_at FROM sweep_state;

-- name: save_sweep_state
INSERT INTO sweep_state (id, scanned_until, last_run_at) VALUES (true, $1, $2)
ON CONFLICT (id) DO UPDATE SET scanned_until = greatest(sweep_state.scanned_until, $1),
                               last_run_at = $2;

-- name: ingestion_progress
SELECT topic, partition, next_offset, last_message_at FROM ingestion_progress
WHERE topic = ANY($1::text[]);

-- name: licenses_at_risk
-- Per customer with devices that fell silent in [$1, $2): the active licenses that would be
-- released (users with no protected device heard from since $2, device licenses of silent
-- devices) and all active licenses. Input of the outage guard.
WITH silent AS (
    SELECT DISTINCT customer_id, user_id, device_id
    FROM devices
    WHERE protected
      AND last_seen_day BETWEEN ($1 AT TIME ZONE 'UTC')::date AND ($2 AT TIME ZONE 'UTC')::date
      AND last_seen_at >= $1 AND last_seen_at < $2
),
users_at_risk AS (
    SELECT DISTINCT s.customer_id, 'user' AS subject_type, s.user_id AS subject_id
    FROM silent AS s
    WHERE s.user_id IS NOT NULL
      AND NOT EXISTS (
          SELECT 1 FROM devices AS d
          WHERE d.customer_id = s.customer_id AND d.user_id = s.user_id
            AND d.protected AND d.last_seen_at >= $2
      )
),
at_risk AS (
    SELECT * FROM users_at_risk
    UNION ALL
    SELECT customer_id, 'device', device_id FROM silent
)
SELECT l.customer_id, count(*) AS at_risk,
       (SELECT count(*) FROM licenses AS a WHERE a.customer_id = l.customer_id AND a.active)
           AS active
FROM at_risk
JOIN licenses AS l USING (customer_id, subject_type, subject_id)
WHERE l.active
GROUP BY l.customer_id;

-- name: silent_devices_page
-- Keyset page of protected devices silent in [$1, $2), after the cursor ($3 day, $4, $5).
SELECT last_seen_day, customer_id, device_id, user_id
FROM devices
WHERE protected
  AND last_seen_day BETWEEN ($1 AT TIME ZONE 'UTC')::date AND ($2 AT TIME ZONE 'UTC')::date
  AND (last_seen_day, customer_id, device_id) > ($3::date, $4, $5)
  AND last_seen_at >= $1 AND last_seen_at < $2
ORDER BY last_seen_day, customer_id, device_id
LIMIT $6;

-- name: silent_devices_of_customer
SELECT last_seen_day, customer_id, device_id, user_id
FROM devices
WHERE customer_id = $1 AND protected
  AND last_seen_day BETWEEN ($2 AT TIME ZONE 'UTC')::date AND ($3 AT TIME ZONE 'UTC')::date
  AND (last_seen_day, device_id) > ($4::date, $5)
  AND last_seen_at >= $2 AND last_seen_at < $3
ORDER BY last_seen_day, device_id
LIMIT $6;

-- name: open_holds
SELECT id, customer_id, from_boundary, to_boundary, at_risk, active, confirmed_at
FROM sweep_holds WHERE applied_at IS NULL ORDER BY customer_id;

-- name: hold_customer
INSERT INTO sweep_holds (customer_id, from_boundary, to_boundary, at_risk, active)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (customer_id) WHERE applied_at IS NULL DO UPDATE SET
    from_boundary = least(sweep_holds.from_boundary, EXCLUDED.from_boundary),
    to_boundary = greatest(sweep_holds.to_boundary, EXCLUDED.to_boundary),
    at_risk = EXCLUDED.at_risk,
    active = EXCLUDED.active;

-- name: extend_unconfirmed_holds
-- A held customer's newly silent devices wait with the rest of its hold.
UPDATE sweep_holds SET to_boundary = greatest(to_boundary, $1)
WHERE applied_at IS NULL AND confirmed_at IS NULL;

-- name: confirm_hold
UPDATE sweep_holds SET confirmed_at = $2, confirmed_by = $3
WHERE customer_id = $1 AND applied_at IS NULL AND confirmed_at IS NULL
RETURNING id;

-- name: mark_hold_applied
UPDATE sweep_holds SET applied_at = $2 WHERE id = $1;

-- name: pseudonym_key
SELECT value FROM service_keys WHERE name = 'pseudonym';

-- name: users_due_for_purge
-- Skips (never waits for) what another transaction holds: a customer the console is
-- changing, a user being decided, so the purge cannot deadlock with them (lock order at
-- the top of this file). The user's row is locked too: nothing can license them again
-- before the purge commits. Only users whose every license event has been published: the
-- purge rewrites the user's id in the outbox, and a release that reached billing under the
-- pseudonym would leave billing charging the user it never saw released. Such users wait
-- for the relay.
SELECT l.customer_id, l.subject_id AS user_id, l.released_at
FROM licenses AS l
JOIN users AS u ON u.customer_id = l.customer_id AND u.user_id = l.subject_id
JOIN customers AS c ON c.customer_id = l.customer_id
WHERE NOT l.active AND l.subject_type = 'user' AND l.purged_at IS NULL AND l.released_at <= $1
  AND NOT EXISTS (
    SELECT FROM license_outbox AS o
    WHERE o.customer_id = l.customer_id AND o.subject_type = 'user'
      AND o.subject_id = l.subject_id AND o.published_at IS NULL
  )
ORDER BY l.released_at, l.customer_id, l.subject_id
LIMIT $2
FOR SHARE OF c SKIP LOCKED
FOR UPDATE OF u, l SKIP LOCKED;

-- name: unlicensed_users_due_for_purge
-- Users without any license of their own, silent since before $1 - $3 (window): due as if
-- released when they fell silent. $1 = decision time - retention, $2 = page size. Skips
-- what is locked, as users_due_for_purge.
SELECT u.customer_id, u.user_id, u.last_seen_at + $3::interval AS released_at
FROM users AS u
JOIN customers AS c ON c.customer_id = u.customer_id
WHERE u.purged_at IS NULL
  AND u.last_seen_day <= (($1::timestamptz - $3::interval) AT TIME ZONE 'UTC')::date
  AND u.last_seen_at <= $1::timestamptz - $3::interval
  AND NOT EXISTS (
      SELECT 1 FROM licenses AS l
      WHERE l.customer_id = u.customer_id AND l.subject_type = 'user'
        AND l.subject_id = u.user_id
  )
ORDER BY u.last_seen_day, u.customer_id, u.user_id
LIMIT $2
FOR SHARE OF c SKIP LOCKED
FOR UPDATE OF u SKIP LOCKED;

-- name: purge_users
-- $1 customers, $2 user ids, $3 pseudonyms, $4 purge time. Removes every personal value of
-- the users from every table; what audit needs stays under the pseudonym.
WITH purged AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
        AS p (customer_id, user_id, pseudonym)
),
users_done AS (
    UPDATE users AS u
    SET user_id = p.pseudonym, email = NULL, display_name = NULL, profile_reported_at = NULL,
        purged_at = $4
    FROM purged AS p
    WHERE u.customer_id = p.customer_id AND u.user_id = p.user_id
    RETURNING 1
),
devices_done AS (
    UPDATE devices AS d
    SET user_id = p.pseudonym, hostname = NULL
    FROM purged AS p
    WHERE d.customer_id = p.customer_id AND d.user_id = p.user_id
    RETURNING 1
),
licenses_done AS (
    UPDATE licenses AS l
    SET subject_id = p.pseudonym, purged_at = $4, updated_at = now()
    FROM purged AS p
    WHERE l.customer_id = p.customer_id AND l.subject_type = 'user' AND l.subject_id = p.user_id
    RETURNING 1
),
history_done AS (
    UPDATE license_history AS h
    SET subject_id = p.pseudonym
    FROM purged AS p
    WHERE h.customer_id = p.customer_id AND h.subject_type = 'user' AND h.subject_id = p.user_id
    RETURNING 1
),
memberships_done AS (
    -- Group membership names the user: it goes too (the console re-adds a returning user).
    DELETE FROM group_members AS m
    USING purged AS p
    WHERE m.customer_id = p.customer_id AND m.user_id = p.user_id
    RETURNING 1
),
outbox_done AS (
    UPDATE license_outbox AS o
    SET subject_id = p.pseudonym,
        payload = jsonb_set(o.payload, '{subject_id}', to_jsonb(p.pseudonym))
    FROM purged AS p
    WHERE o.customer_id = p.customer_id AND o.subject_type = 'user' AND o.subject_id = p.user_id
    RETURNING 1
)
SELECT (SELECT count(*) FROM users_done) AS users,
       (SELECT count(*) FROM devices_done) AS devices,
       (SELECT count(*) FROM licenses_done) AS licenses,
       (SELECT count(*) FROM history_done) AS history,
       (SELECT count(*) FROM memberships_done) AS memberships,
       (SELECT count(*) FROM outbox_done) AS outbox;

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

-- name: license_totals
-- Totals for the metrics: licenses in use by subject type and basis, and customers holding
-- any. Per-customer figures are the usage report's business, not a metric's.
SELECT subject_type, basis, count(*) AS licenses,
       count(DISTINCT customer_id) AS customers
FROM licenses
WHERE active
GROUP BY subject_type, basis;

-- name: customers_with_licenses
SELECT count(DISTINCT customer_id) AS customers FROM licenses WHERE active;

-- Administrative events (tenant.admin.v1). Every change carries the console's event time and
-- is applied only if it is not older than the stored one.

-- name: ensure_customer
INSERT INTO customers (customer_id) VALUES ($1) ON CONFLICT (customer_id) DO NOTHING;

-- name: update_customer_profile
-- $1 customer, $2 name (NULL: keep), $3 license model (NULL: keep), $4 occurred_at.
-- Returns the license model before and after; no row when the change is older.
WITH previous AS (
    SELECT customer_id, license_model FROM customers WHERE customer_id = $1 FOR UPDATE
)
UPDATE customers AS c
SET name = coalesce($2, c.name),
    license_model = coalesce($3, c.license_model),
    profile_changed_at = $4
FROM previous AS p
WHERE c.customer_id = p.customer_id
  AND (c.profile_changed_at IS NULL OR c.profile_changed_at <= $4)
RETURNING p.license_model AS previous_model, c.license_model;

-- name: set_customer_status
-- $1 customer, $2 status, $3 occurred_at. Returns the status before; no row when older.
WITH previous AS (
    SELECT customer_id, status FROM customers WHERE customer_id = $1 FOR UPDATE
)
UPDATE customers AS c
SET status = $2, status_changed_at = $3
FROM previous AS p
WHERE c.customer_id = p.customer_id
  AND (c.status_changed_at IS NULL OR c.status_changed_at <= $3)
RETURNING p.status AS previous_status;

-- name: attach_subscription
-- $1 customer, $2 subscription, $3 package, $4 group, $5 status, $6 trial end, $7 seats,
-- $8 occurred_at. Returns the status before (NULL when new); no row when older.
INSERT INTO subscriptions AS s (
    customer_id, subscription_id, package, group_id, status, trial_ends_at, seats,
    attached_at, status_changed_at
)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)
ON CONFLICT (customer_id, subscription_id) DO UPDATE SET
    package = EXCLUDED.package,
    group_id = EXCLUDED.group_id,
    status = EXCLUDED.status,
    trial_ends_at = EXCLUDED.trial_ends_at,
    seats = EXCLUDED.seats,
    attached_at = EXCLUDED.attached_at,
    status_changed_at = EXCLUDED.status_changed_at,
    trial_converted_at = NULL
WHERE s.status_changed_at <= EXCLUDED.status_changed_at
RETURNING (SELECT status FROM subscriptions
           WHERE customer_id = $1 AND subscription_id = $2) AS previous_status,
          s.package, s.group_id;

-- name: change_subscription_status
-- $1 customer, $2 subscription, $3 status, $4 trial end (kept when NULL), $5 occurred_at.
-- A console change wins over the automatic trial conversion it predates (the conversion is
-- not a console change, so it does not move status_changed_at).
WITH previous AS (
    SELECT customer_id, subscription_id, status
    FROM subscriptions
    WHERE customer_id = $1 AND subscription_id = $2
    FOR UPDATE
)
UPDATE subscriptions AS s
SET status = $3,
    trial_ends_at = coalesce($4, s.trial_ends_at),
    status_changed_at = $5,
    trial_converted_at = NULL
FROM previous AS p
WHERE s.customer_id = p.customer_id AND s.subscription_id = p.subscription_id
  AND s.status_changed_at <= $5
RETURNING p.status AS previous_status, s.package, s.group_id, s.trial_ends_at;

-- name: subscription_exists
SELECT EXISTS (
    SELECT 1 FROM subscriptions WHERE customer_id = $1 AND subscription_id = $2
);

-- name: set_group_membership
-- $1 customer, $2 group, $3 user, $4 member, $5 occurred_at. Returns whether the user was a
-- member before (NULL when never); no row when older.
INSERT INTO group_members AS m (customer_id, group_id, user_id, member, changed_at)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (customer_id, group_id, user_id) DO UPDATE SET
    member = EXCLUDED.member,
    changed_at = EXCLUDED.changed_at
WHERE m.changed_at <= EXCLUDED.changed_at
RETURNING (SELECT member FROM group_members
           WHERE customer_id = $1 AND group_id = $2 AND user_id = $3) AS previous_member;

-- name: decision_groups_of_customer
-- Every unit of license decision of one customer: each user with devices or a license,
-- each device without a user.
SELECT 'user' AS subject_type, user_id AS subject_id
FROM devices WHERE customer_id = $1 AND user_id IS NOT NULL
UNION
SELECT 'device', device_id FROM devices WHERE customer_id = $1 AND user_id IS NULL
UNION
SELECT 'user', subject_id FROM licenses
WHERE customer_id = $1 AND subject_type = 'user' AND active;

-- name: trials_due
-- In-trial subscriptions whose trial has ended by $1; they turn active.
UPDATE subscriptions
SET status = 'active', trial_converted_at = trial_ends_at
WHERE status = 'in_trial' AND trial_ends_at <= $1
RETURNING customer_id, subscription_id, package, group_id, trial_ends_at;

-- name: snapshot_counts
-- Active licenses by kind and package of every active customer without a snapshot for the
-- day $1 (a customer with none has one row of NULLs and 0).
SELECT c.customer_id, l.subject_type, l.basis, l.package, count(l.subject_id) AS licenses
FROM customers AS c
LEFT JOIN licenses AS l ON l.customer_id = c.customer_id AND l.active
WHERE c.status = 'active'
  AND NOT EXISTS (
      SELECT 1 FROM usage_snapshots AS s WHERE s.customer_id = c.customer_id AND s.day = $1
  )
GROUP BY c.customer_id, l.subject_type, l.basis, l.package
ORDER BY c.customer_id;

-- name: record_usage_snapshots
INSERT INTO usage_snapshots (customer_id, day, event_id, taken_at)
SELECT customer_id, $2, event_id, $3
FROM unnest($1::text[], $4::uuid[]) AS s (customer_id, event_id)
ON CONFLICT (customer_id, day) DO NOTHING;

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

-- Ingestion: a batch's signals written in one transaction (worker/db/session.py,
-- Session.write_signals), and the per-partition progress stored with them.
-- Row locks follow the one lock order stated at the top of licensing.sql.

-- name: upsert_customers
-- $1: customer ids, sorted (a fixed lock order keeps concurrent workers out of deadlocks).
INSERT INTO customers (customer_id)
SELECT customer_id FROM unnest($1::text[]) AS batch (customer_id)
ON CONFLICT (customer_id) DO NOTHING;

-- name: existing_customers
-- Which of the batch's customers ($1) exist: with UNKNOWN_CUSTOMERS=refuse, the signals of
-- the others go to the DLQ (worker/ingest/loop.py).
SELECT customer_id FROM customers WHERE customer_id = ANY($1::text[]);

-- name: share_customers
-- Taken before any user or device lock by every transaction that decides licenses (ingestion
-- here, then decide_groups): the shared side of each customer's advisory lock, which
-- conflicts only with lock_customer_key, so a console change (memberships, subscriptions,
-- status) or an erasure and a license decision for the same customer never run at once and
-- never miss each other's writes. Not a row lock: the customers' rows, which every batch
-- touches, get no lock, no multixact and no WAL (docs/licensing.md, "Concurrency").
-- The key: the two-int form, class 773629486 = hashtext('license-telemetry:customer'), then
-- hashtext(customer_id); the one-bigint locks (relay, sweeper, migrations) never meet it.
-- Customers whose keys collide share one lock: only more waiting, never less exclusion.
-- One statement, keys sorted and distinct: the aggregate takes them in the sort's order.
SELECT count(pg_advisory_xact_lock_shared(773629486, k))
FROM (
    SELECT DISTINCT hashtext(customer_id) AS k
    FROM unnest($1::text[]) AS batch (customer_id)
    ORDER BY k
) AS keys;

-- name: insert_new_users
-- The users the batch names ($1, $2 ...) that are not stored yet, inserted in key order
-- before any user row is locked, with what upsert_users would store. Returns those this
-- statement created, with their first sighting. A user no lock statement could see (it does
-- not exist yet) would otherwise be locked later, by upsert_users, out of key order: when a
-- third transaction creates it in between, and another batch that locked it then waits for
-- a user this batch holds, the two deadlock (found in the fault run). Here a batch that
-- meets another's uncommitted insert of the same user waits for it holding no user row.
-- The caller leaves out the users its last-seen memory knows stored (the remembered user of
-- a device it refreshes): the steady state then runs no such statement. Such a user removed
-- since (an erasure, a purge) is inserted by upsert_users again: Postgres's deadlock
-- detection is then the only guard left, and the batch is retried.
-- The NOT EXISTS spares the stored users a conflict (ON CONFLICT DO NOTHING would wait for
-- a transaction updating one); erased customers store nothing (as upsert_users).
WITH inserted AS (
    INSERT INTO users AS u (
        customer_id, user_id, email, display_name, profile_reported_at, first_seen_at, last_seen_at
    )
    SELECT * FROM unnest(
        $1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[],
        $7::timestamptz[]
    ) AS b (customer_id, user_id, email, display_name, profile_reported_at, first_seen_at,
            last_seen_at)
    WHERE NOT EXISTS (
        SELECT FROM users AS e WHERE e.customer_id = b.customer_id AND e.user_id = b.user_id
    )
    AND NOT EXISTS (
        SELECT FROM customers AS c WHERE c.customer_id = b.customer_id AND c.erased_at IS NOT NULL
    )
    ORDER BY b.customer_id, b.user_id
    ON CONFLICT (customer_id, user_id) DO NOTHING
    RETURNING u.customer_id, u.user_id, u.first_seen_at
)
SELECT customer_id, user_id, first_seen_at FROM inserted;

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

-- name: lock_devices_without_user
-- The batch's stored devices ($1, $2) that have no user, locked in key order after the
-- users and before the device upsert: a device with a user is guarded by its user's lock,
-- one without by its own row. Two replicas writing one such device (its heartbeat and
-- lifecycle partitions on different consumers) then write it one after the other, and the
-- upsert's `before` is the row it updates.
SELECT d.customer_id, d.device_id
FROM devices AS d
JOIN unnest($1::text[], $2::text[]) AS b (customer_id, device_id)
    USING (customer_id, device_id)
WHERE d.user_id IS NULL
ORDER BY d.customer_id, d.device_id
FOR NO KEY UPDATE OF d;

-- name: upsert_users
-- The batch's users that insert_new_users did not create, all locked before by
-- lock_device_users (one removed since, e.g. purged, is inserted again). Returns the users
-- this statement created (xmax 0: inserted, not updated) with their first sighting: new to
-- this transaction, they hold no license yet and their rows are locked by the insert, so a
-- decision about them reads and locks nothing more (decide_groups).
WITH upserted AS (
    INSERT INTO users AS u (
        customer_id, user_id, email, display_name, profile_reported_at, first_seen_at, last_seen_at
    )
    SELECT * FROM unnest(
        $1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[],
        $7::timestamptz[]
    ) AS b (customer_id, user_id, email, display_name, profile_reported_at, first_seen_at,
            last_seen_at)
    -- Nothing is stored for an erased customer (migration 0009): a late signal does not
    -- bring its people back.
    WHERE NOT EXISTS (
        SELECT FROM customers AS c WHERE c.customer_id = b.customer_id AND c.erased_at IS NOT NULL
    )
    ON CONFLICT (customer_id, user_id) DO UPDATE SET
        email = CASE WHEN EXCLUDED.profile_reported_at >= coalesce(u.profile_reported_at, '-infinity')
                     THEN EXCLUDED.email ELSE u.email END,
        display_name = CASE WHEN EXCLUDED.profile_reported_at >= coalesce(u.profile_reported_at, '-infinity')
                            THEN EXCLUDED.display_name ELSE u.display_name END,
        profile_reported_at = greatest(u.profile_reported_at, EXCLUDED.profile_reported_at),
        first_seen_at = least(u.first_seen_at, EXCLUDED.first_seen_at),
        last_seen_at = greatest(u.last_seen_at, EXCLUDED.last_seen_at)
    RETURNING u.customer_id, u.user_id, u.first_seen_at, u.xmax = 0 AS created
)
SELECT customer_id, user_id, first_seen_at FROM upserted WHERE created;

-- name: upsert_devices
-- Returns the devices whose change can change a license (`relevant`): new, (un)installed,
-- moved to another user, kind changed, first seen earlier (the covered devices are the
-- earliest first seen: a late, older event can move an over-allowance license), or heard
-- from after having been silent past the window ($17). With $19, every device written,
-- with what the replica remembers of it to skip its next heartbeats without a read
-- (worker/ingest/last_seen_memory.py). Appends the device history of those whose user,
-- kind or install state changed (`recorded`). With each, the facts the license rules read
-- (as lock_group_devices) and whether this statement created it (`created`, xmax 0): a new
-- device holds no license, and its insert locks it (decide_groups reads nothing more of it).
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
    -- Nothing is stored for an erased customer (as upsert_users).
    WHERE NOT EXISTS (
        SELECT FROM customers AS c
        WHERE c.customer_id = b.customer_id AND c.erased_at IS NOT NULL
    )
),
before AS (
    -- No FOR UPDATE: locking every row first would write each tuple twice. Two replicas can
    -- write one device at once (its heartbeat and lifecycle partitions may be assigned to
    -- different consumers): for a device with a user, the user locks make the later writer
    -- wait, for one without, lock_devices_without_user does; so this snapshot is current.
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
    RETURNING d.customer_id, d.device_id, d.user_id, d.device_kind, d.protected, d.first_seen_at,
              d.last_seen_at, d.agent_version, d.last_present_at, d.last_uninstalled_at,
              d.xmax = 0 AS created
),
recorded AS (
    -- The device history (migration 0012) for `report usage --as-of`: a row when a device is
    -- new or its user, kind or install state changed, set-based from the before-image, in this
    -- statement; a heartbeat that changes none of them writes nothing. $18: the service's
    -- clock (NULL: the transaction's).
    INSERT INTO device_history (
        customer_id, device_id, user_id, device_kind, protected, seen_at, recorded_at
    )
    SELECT u.customer_id, u.device_id, u.user_id, u.device_kind, coalesce(u.protected, false),
           u.last_seen_at,
           coalesce($18::timestamptz, now())
    FROM upserted AS u
    LEFT JOIN before AS b USING (customer_id, device_id)
    WHERE b.device_id IS NULL
       OR u.protected IS DISTINCT FROM b.protected
       OR u.user_id IS DISTINCT FROM b.user_id
       OR u.device_kind IS DISTINCT FROM b.device_kind
),
decided AS (
    SELECT u.*, b.user_id AS previous_user_id,
           (b.device_id IS NULL
            OR u.protected IS DISTINCT FROM b.protected
            OR u.user_id IS DISTINCT FROM b.user_id
            OR u.device_kind IS DISTINCT FROM b.device_kind
            OR u.first_seen_at IS DISTINCT FROM b.first_seen_at
            OR (u.protected AND b.last_seen_at < $17::timestamptz)) AS relevant
    FROM upserted AS u
    LEFT JOIN before AS b USING (customer_id, device_id)
)
SELECT customer_id, device_id, user_id, previous_user_id, relevant, last_seen_at, device_kind,
       protected, agent_version, first_seen_at, last_present_at, last_uninstalled_at, created
FROM decided
WHERE relevant OR $19::boolean;

-- name: refresh_devices
-- The steady state's writes: heartbeats of devices this replica remembers, that only move the
-- last seen (by the last-seen precision or more) and the report times of what the device
-- already has (worker/ingest/last_seen_memory.py, `refresh_candidates`). A plain UPDATE of
-- the columns that move, with no before-image, no history and no license facts: applied only
-- where the stored row makes it exactly what upsert_devices would write, and not
-- license-relevant (installed, the same user, kind and agent version where the batch names
-- them, first seen not earlier, not silent past the window $10). The rows it does not return
-- are written by upsert_devices in the same transaction. Runs after the locks of
-- lock_device_users and lock_devices_without_user, like upsert_devices. Returns what the
-- replica remembers of each row.
UPDATE devices AS d SET
    user_reported_at = greatest(d.user_reported_at, b.user_reported_at),
    kind_reported_at = greatest(d.kind_reported_at, b.kind_reported_at),
    agent_version_reported_at = greatest(d.agent_version_reported_at,
                                         b.agent_version_reported_at),
    last_seen_at = greatest(d.last_seen_at, b.last_seen_at),
    last_present_at = greatest(d.last_present_at, b.last_present_at)
FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::timestamptz[],
    $7::text[], $8::timestamptz[], $9::timestamptz[], $11::timestamptz[], $12::timestamptz[]
) AS b (
    customer_id, device_id, user_id, user_reported_at, device_kind, kind_reported_at,
    agent_version, agent_version_reported_at, first_seen_at, last_seen_at, last_present_at
)
WHERE d.customer_id = b.customer_id
  AND d.device_id = b.device_id
  AND d.protected
  AND d.last_seen_at >= $10::timestamptz
  AND d.first_seen_at <= b.first_seen_at
  AND (b.user_reported_at IS NULL OR d.user_id IS NOT DISTINCT FROM b.user_id)
  AND (b.kind_reported_at IS NULL OR d.device_kind IS NOT DISTINCT FROM b.device_kind)
  AND (b.agent_version_reported_at IS NULL
       OR d.agent_version IS NOT DISTINCT FROM b.agent_version)
  -- Nothing is stored for an erased customer (as upsert_devices).
  AND NOT EXISTS (
      SELECT FROM customers AS c WHERE c.customer_id = b.customer_id AND c.erased_at IS NOT NULL
  )
RETURNING d.customer_id, d.device_id, d.last_seen_at, d.user_id, d.device_kind, d.agent_version,
          d.protected;

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
-- The table is partitioned by occurred_at (migration 0015), so its key is (customer_id,
-- event_id, occurred_at): a redelivered event (the same time) conflicts; one stored with
-- another time (its agent clock ahead, clamped at each delivery to that delivery's receive
-- time) is found by its id alone, a probe of the key's index in each partition.
INSERT INTO device_lifecycle_events (customer_id, event_id, device_id, event_type, occurred_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[])
    AS b (customer_id, event_id, device_id, event_type, occurred_at)
-- Its device was not stored (upsert_devices): nothing for an erased customer.
WHERE NOT EXISTS (
    SELECT FROM customers AS c WHERE c.customer_id = b.customer_id AND c.erased_at IS NOT NULL
)
  AND NOT EXISTS (
    SELECT FROM device_lifecycle_events AS e
    WHERE e.customer_id = b.customer_id AND e.event_id = b.event_id
)
ON CONFLICT (customer_id, event_id, occurred_at) DO NOTHING
RETURNING customer_id, event_id;

-- name: record_ingestion_progress
INSERT INTO ingestion_progress AS p (topic, partition, next_offset, last_message_at)
SELECT * FROM unnest($1::text[], $2::integer[], $3::bigint[], $4::timestamptz[])
ON CONFLICT (topic, partition) DO UPDATE SET
    next_offset = greatest(p.next_offset, EXCLUDED.next_offset),
    last_message_at = greatest(p.last_message_at, EXCLUDED.last_message_at),
    updated_at = now();

-- name: ingestion_progress
SELECT topic, partition, next_offset, last_message_at FROM ingestion_progress
WHERE topic = ANY($1::text[]);

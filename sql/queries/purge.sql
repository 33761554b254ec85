-- The purge of personal data (run by the sweeper): users released longer ago than the
-- retention, or never licensed, get a keyed pseudonym in every table.
-- It never waits for a row lock (SKIP LOCKED): see the lock order at the top of
-- licensing.sql.

-- name: users_due_for_purge
-- Skips (never waits for) what another transaction holds: a customer the console is
-- changing, a user being decided, so the purge cannot deadlock with them (lock order at
-- the top of licensing.sql). The user's row is locked too: nothing can license them again
-- before the purge commits. Only users whose every license event has been published: the
-- purge rewrites the user's id in the outbox, and a release that reached billing under the
-- pseudonym would leave billing charging the user it never saw released. Such users wait
-- for the relay. A legal hold on the user or their customer keeps them (legal_holds).
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
  AND NOT EXISTS (
    SELECT FROM legal_holds AS h
    WHERE h.customer_id = l.customer_id
      AND (h.scope = 'customer' OR (h.scope = 'user' AND h.subject_id = l.subject_id))
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
  AND NOT EXISTS (
      SELECT FROM legal_holds AS h
      WHERE h.customer_id = u.customer_id
        AND (h.scope = 'customer' OR (h.scope = 'user' AND h.subject_id = u.user_id))
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
device_history_done AS (
    -- The device history's users (migration 0012): the pseudonym, as in `devices`.
    UPDATE device_history AS h
    SET user_id = p.pseudonym
    FROM purged AS p
    WHERE h.customer_id = p.customer_id AND h.user_id = p.user_id
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
baseline_done AS (
    -- The history kept from before the retained range (migration 0015): the same rewrite.
    UPDATE license_history_baseline AS b
    SET subject_id = p.pseudonym
    FROM purged AS p
    WHERE b.customer_id = p.customer_id AND b.subject_type = 'user' AND b.subject_id = p.user_id
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
       (SELECT count(*) FROM device_history_done) AS device_history,
       (SELECT count(*) FROM licenses_done) AS licenses,
       (SELECT count(*) FROM history_done) AS history,
       (SELECT count(*) FROM memberships_done) AS memberships,
       (SELECT count(*) FROM outbox_done) AS outbox;

-- name: devices_without_user_due_for_purge
-- Devices without a user that still have a host name, hold no license, and whose license
-- ended (or, never licensed, whose last signal + the window $3) at least the retention ago:
-- $1 = decision time - retention, $2 = page size. Skips what is locked and held customers,
-- as users_due_for_purge. A device's own row is the lock of its license decision.
SELECT d.customer_id, d.device_id
FROM devices AS d
JOIN customers AS c ON c.customer_id = d.customer_id
LEFT JOIN licenses AS l
    ON l.customer_id = d.customer_id AND l.subject_type = 'device' AND l.subject_id = d.device_id
WHERE d.user_id IS NULL AND d.hostname IS NOT NULL
  AND NOT coalesce(l.active, false)
  AND coalesce(l.released_at, d.last_seen_at + $3::interval) <= $1::timestamptz
  AND NOT EXISTS (
      SELECT FROM legal_holds AS h
      WHERE h.customer_id = d.customer_id AND h.scope = 'customer'
  )
ORDER BY d.customer_id, d.device_id
LIMIT $2
FOR SHARE OF c SKIP LOCKED
FOR UPDATE OF d SKIP LOCKED;

-- name: purge_devices
-- $1 customers, $2 device ids, locked by the caller. Removes a device's personal data: its
-- host name and its link to a user. The row stays (audit, lifecycle events). A device that
-- loses its user gets a device history row without one, recorded at $3 (the service's
-- clock): from then on an as-of report shows it without a user.
WITH detached AS (
    -- Reads the rows as they were before the UPDATE below (one snapshot per statement).
    INSERT INTO device_history (
        customer_id, device_id, user_id, device_kind, protected, seen_at, recorded_at
    )
    SELECT d.customer_id, d.device_id, NULL, d.device_kind, coalesce(d.protected, false),
           d.last_seen_at,
           $3::timestamptz
    FROM devices AS d
    JOIN unnest($1::text[], $2::text[]) AS p (customer_id, device_id)
        USING (customer_id, device_id)
    WHERE d.user_id IS NOT NULL
)
UPDATE devices AS d
SET hostname = NULL, user_id = NULL
FROM unnest($1::text[], $2::text[]) AS p (customer_id, device_id)
WHERE d.customer_id = p.customer_id AND d.device_id = p.device_id
  AND (d.hostname IS NOT NULL OR d.user_id IS NOT NULL);

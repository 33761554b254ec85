-- The sweeper (worker/licensing/sweeper.py; its leadership is a lease, leases.sql): the
-- silent devices it releases, the outage guard's holds, trial ends and daily usage snapshots.
-- Row locks follow the one lock order stated at the top of licensing.sql.

-- name: sweep_state
SELECT scanned_until, last_run_at FROM sweep_state;

-- name: save_sweep_state
INSERT INTO sweep_state (id, scanned_until, last_run_at) VALUES (true, $1, $2)
ON CONFLICT (id) DO UPDATE SET scanned_until = greatest(sweep_state.scanned_until, $1),
                               last_run_at = $2;

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
-- $3: an optional note. confirmed_by is the database login (session_user), also enforced by
-- migration 0009's trigger whatever a statement writes.
UPDATE sweep_holds SET confirmed_at = $2, confirmed_by = session_user, confirmation_note = $3
WHERE customer_id = $1 AND applied_at IS NULL AND confirmed_at IS NULL
RETURNING id, confirmed_by;

-- name: mark_hold_applied
-- $3: the hold's customer (one shard on Citus, docs/scaling.md).
UPDATE sweep_holds SET applied_at = $2 WHERE customer_id = $3 AND id = $1;

-- name: trials_due
-- In-trial subscriptions of active customers whose trial has ended by $1; they turn active,
-- effective at the trial's end, or at the customer's reactivation if the trial ended while
-- the customer was inactive (an inactive customer's trial never converts).
UPDATE subscriptions AS s
SET status = 'active',
    trial_converted_at = greatest(s.trial_ends_at, coalesce(c.status_changed_at, s.trial_ends_at))
FROM customers AS c
WHERE c.customer_id = s.customer_id AND c.status = 'active'
  AND s.status = 'in_trial' AND s.trial_ends_at <= $1
RETURNING s.customer_id, s.subscription_id, s.package, s.group_id, s.trial_ends_at,
          s.trial_converted_at AS activated_at;

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

-- name: seat_usage
-- Every live subscription with seats, of active customers ($1, or all when NULL), with its
-- licensed users now (the sweeper's seat check and the live usage report):
-- a group's subscription counts the group's licensed members attributed its package; a
-- customer-wide one counts the customer's licensed users attributed its package who are
-- not members of a group with a live subscription of that package (those count there).
-- A device-model customer has no licensed users: its device licenses count instead.
SELECT s.customer_id, s.subscription_id, s.package, s.group_id, s.seats, s.over_seats,
       (
           SELECT count(*)
           FROM licenses AS l
           WHERE l.customer_id = s.customer_id AND l.active AND l.package = s.package
             AND l.subject_type = CASE c.license_model WHEN 'device' THEN 'device' ELSE 'user' END
             AND CASE
                 WHEN s.group_id IS NOT NULL THEN EXISTS (
                     SELECT 1 FROM group_members AS m
                     WHERE m.customer_id = s.customer_id AND m.group_id = s.group_id
                       AND m.user_id = l.subject_id AND m.member
                 )
                 ELSE NOT EXISTS (
                     SELECT 1
                     FROM group_members AS m
                     JOIN subscriptions AS g
                       ON g.customer_id = m.customer_id AND g.group_id = m.group_id
                     WHERE m.customer_id = s.customer_id AND m.user_id = l.subject_id
                       AND m.member AND g.package = s.package AND g.status IN ('in_trial', 'active')
                 )
             END
       ) AS used
FROM subscriptions AS s
JOIN customers AS c ON c.customer_id = s.customer_id
WHERE s.seats IS NOT NULL AND s.status IN ('in_trial', 'active') AND c.status = 'active'
  AND ($1::text IS NULL OR s.customer_id = $1)
ORDER BY s.customer_id, s.subscription_id;

-- name: save_seat_state
UPDATE subscriptions AS s
SET over_seats = v.over_seats
FROM unnest($1::text[], $2::text[], $3::boolean[]) AS v (customer_id, subscription_id, over_seats)
WHERE s.customer_id = v.customer_id AND s.subscription_id = v.subscription_id;

-- name: maintain_partitions
-- One partitioned table ($1: license_history, device_lifecycle_events or usage_snapshots):
-- partitions created $4 months ahead of $2 (the sweeper's clock), those wholly older than
-- $3 months (the table's retention) dropped; only through the SECURITY DEFINER function of
-- migration 0015 (docs/scaling.md, "Partitioning and retention").
SELECT created, dropped, moved, deleted, retained_from
FROM maintain_partitions($1::text, $2::timestamptz, make_interval(months => $3::integer),
                         $4::integer);

-- License decisions (worker/licensing/decisions.py, worker/db/session.py): the facts a
-- decision reads, the rows it locks, and the license state, history and outbox it writes.
--
-- Lock order (docs/licensing.md, "Concurrency"): every transaction takes its row locks in
-- this order of tables, and the rows of one table in key order, in one statement each:
--   customers: not their rows but a transaction-scoped advisory lock per customer
--     (share_customers: shared, by every license decision; lock_customer_key: exclusive, by
--     a console change or an erasure, which then lock the customer's row FOR UPDATE too,
--     for the purge's SKIP LOCKED), in lock-key order
--   -> users, by (customer_id, user_id): a user's row is the lock of its license decision
--   -> devices, by (customer_id, device_id)
--   -> lifecycle events, ingestion progress (by topic, partition)
--   -> licenses, by (customer_id, subject_type, subject_id)
--   -> license history and outbox (appended; unique event ids).
-- Arrays handed to INSERT ... ON CONFLICT are sorted by the caller (rows are locked in array
-- order); UPDATE ... FROM unnest(...) only touches rows locked before, or locks them in a
-- sorted CTE. The purge skips what is locked (SKIP LOCKED) instead of waiting. A row this
-- transaction inserted (a new user or device, see upsert_users, upsert_devices) is locked by
-- its insert: a decision does not lock it again (decide_groups).

-- name: customer_terms
-- What a license decision needs of its customers. Read after share_customers, in a statement
-- of its own: under READ COMMITTED its snapshot is taken once the lock is held, so it sees
-- the console change it may have waited for. $1 sorted.
SELECT customer_id, license_model, status, status_changed_at
FROM customers
WHERE customer_id = ANY($1::text[])
ORDER BY customer_id;

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

-- name: lock_group_users
-- The users of a license decision ($1, $2), in key order, before their devices: see
-- lock_device_users. Their first sighting bounds a first allocation's effective time.
SELECT u.customer_id, u.user_id, u.first_seen_at
FROM users AS u
JOIN unnest($1::text[], $2::text[]) AS g (customer_id, user_id) USING (customer_id, user_id)
ORDER BY u.customer_id, u.user_id
FOR NO KEY UPDATE OF u;

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
-- touch rows this transaction holds, or insert new ones in the same order. `last_event_at`:
-- the effective time of the subject's latest license event, which its next one may not
-- precede (docs/licensing.md, "The one rule for effective times"): its release, or its
-- allocation or a package change after it (the history's license.package_changed events;
-- a subject's events take effect in order, so earlier ones are not later than the
-- allocation).
SELECT l.customer_id, l.subject_type, l.subject_id, l.active, l.basis, l.package,
       l.event_sequence, l.allocated_at, l.released_at,
       CASE WHEN l.active THEN greatest(l.allocated_at, (
           SELECT max(h.effective_at)
           FROM license_history AS h
           WHERE h.customer_id = l.customer_id AND h.subject_type = l.subject_type
             AND h.subject_id = l.subject_id AND h.change = 'package_changed'
             AND h.event_id IS NOT NULL
       )) ELSE l.released_at END AS last_event_at
FROM licenses AS l
JOIN unnest($1::text[], $2::text[], $3::text[]) AS s (customer_id, subject_type, subject_id)
    USING (customer_id, subject_type, subject_id)
WHERE l.purged_at IS NULL
ORDER BY l.customer_id, l.subject_type, l.subject_id
FOR UPDATE OF l;

-- name: unsettled_allocations
-- The allocations of subjects ($1, $2, $3) still in their settle window as of $4 (the
-- decision's clock) and not published, locked (after their licenses, see the lock order):
-- the relay skips what a decision holds, and a decision waits for a relay publishing them,
-- then no longer sees them. With each, the release billing saw last (if any): the state
-- the subject returns to if the allocation is withdrawn. Only an allocation that is still
-- its subject's last event: one an event already follows (a package change or a release
-- decided on a clock at which it had settled) is never withdrawn, since the withdrawal
-- removes the allocation's outbox row alone and would leave the later event behind.
SELECT o.customer_id, o.subject_type, o.subject_id, o.event_id, o.payload::text AS payload,
       r.basis AS settled_basis, r.package AS settled_package,
       r.effective_at AS settled_released_at, r.reason AS settled_reason
FROM license_outbox AS o
JOIN unnest($1::text[], $2::text[], $3::text[]) AS s (customer_id, subject_type, subject_id)
    USING (customer_id, subject_type, subject_id)
LEFT JOIN LATERAL (
    SELECT r.basis, r.package, r.effective_at, r.reason
    FROM (
        SELECT h.id, h.basis, h.package, h.effective_at, h.reason
        FROM license_history AS h
        WHERE h.customer_id = o.customer_id AND h.subject_type = o.subject_type
          AND h.subject_id = o.subject_id AND h.change = 'released'
        UNION ALL
        -- A release before the retained history (migration 0015), if it was the last change.
        SELECT b.id, b.basis, b.package, b.effective_at, b.reason
        FROM license_history_baseline AS b
        WHERE b.customer_id = o.customer_id AND b.subject_type = o.subject_type
          AND b.subject_id = o.subject_id AND b.change = 'released'
    ) AS r
    ORDER BY r.id DESC
    LIMIT 1
) AS r ON true
WHERE o.published_at IS NULL AND o.settles_at > $4::timestamptz
  AND o.payload->>'type' = 'license.allocated'
  AND NOT EXISTS (
      SELECT FROM license_outbox AS later
      WHERE later.customer_id = o.customer_id AND later.subject_type = o.subject_type
        AND later.subject_id = o.subject_id AND later.id > o.id
  )
ORDER BY o.id
FOR UPDATE OF o;

-- name: withdraw_license_events
-- Withdrawn allocations ($1, event ids; locked by unsettled_allocations): their outbox rows,
-- their subjects' history from the allocation on (a basis or package change made while it
-- was pending included), and the license rows they were the first event of. Billing never
-- heard of any of it. The worker has no DELETE on these tables: the function (migration
-- 0011) deletes only unpublished allocations in their settle window. Returns the withdrawn
-- event ids.
SELECT event_id FROM withdraw_unsettled_allocations($1::uuid[]) AS w (event_id);

-- name: restore_released_licenses
-- Subjects whose withdrawn allocation followed a release: back to that release (basis,
-- package, time, reason) and its event number $8. Locked by held_licenses.
UPDATE licenses AS l
SET active = false, basis = x.basis, package = x.package, released_at = x.released_at,
    release_reason = x.reason, event_sequence = x.event_sequence, updated_at = now()
FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::text[],
    $8::integer[]
) AS x (customer_id, subject_type, subject_id, basis, package, released_at, reason, event_sequence)
WHERE l.customer_id = x.customer_id AND l.subject_type = x.subject_type
  AND l.subject_id = x.subject_id AND l.event_sequence = x.event_sequence + 1 AND l.active;

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
-- A held license whose basis changed within its package (no event). One row per subject, as
-- release_licenses.
UPDATE licenses AS l
SET basis = x.basis, package = x.package, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
    AS x (customer_id, subject_type, subject_id, basis, package)
WHERE l.customer_id = x.customer_id
  AND l.subject_type = x.subject_type
  AND l.subject_id = x.subject_id;

-- name: change_license_packages
-- Held licenses moved to another package $5 (and basis $4, if that changed too). $6 is the
-- subject's event number of the change (license.package_changed), written only over number
-- $6 - 1 (see allocate_licenses). Returns the rows written. One row per subject, sorted,
-- locked by held_licenses.
UPDATE licenses AS l
SET basis = x.basis, package = x.package, event_sequence = x.event_sequence, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::integer[])
    AS x (customer_id, subject_type, subject_id, basis, package, event_sequence)
WHERE l.customer_id = x.customer_id
  AND l.subject_type = x.subject_type
  AND l.subject_id = x.subject_id
  AND l.active
  AND l.event_sequence = x.event_sequence - 1
RETURNING 1;

-- name: append_license_history
-- The history rows of a decision's changes and, for those that announce an event ($10 not
-- NULL), their outbox rows (as enqueue_license_events; $11 payload, $12 when an allocation
-- settles), in one statement: one round trip for both appends. $9: when it was decided.
WITH history AS (
    INSERT INTO license_history (
        customer_id, subject_type, subject_id, change, basis, reason, effective_at, package,
        decided_at, event_id
    )
    SELECT c, t, s, ch, b, r, e, p, $9::timestamptz, ev
    FROM unnest(
        $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
        $7::timestamptz[], $8::text[], $10::uuid[]
    ) AS x (c, t, s, ch, b, r, e, p, ev)
)
INSERT INTO license_outbox (event_id, customer_id, subject_type, subject_id, payload, settles_at)
SELECT ev, c, t, s, payload, settles_at
FROM unnest($1::text[], $2::text[], $3::text[], $10::uuid[], $11::jsonb[], $12::timestamptz[])
    WITH ORDINALITY AS x (c, t, s, ev, payload, settles_at, n)
WHERE ev IS NOT NULL
ORDER BY n
ON CONFLICT (event_id) DO NOTHING;

-- name: enqueue_license_events
-- $6: when an allocation settles (NULL: publish at once).
INSERT INTO license_outbox (event_id, customer_id, subject_type, subject_id, payload, settles_at)
SELECT * FROM unnest(
    $1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::timestamptz[]
)
ON CONFLICT (event_id) DO NOTHING;

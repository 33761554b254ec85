-- Erasure on request and legal holds (worker/licensing/erasures.py). Row locks follow the
-- one lock order stated at the top of licensing.sql: customers, users, devices, licenses,
-- then the appended history, outbox and audit rows. Unlike the purge, an erasure waits for
-- the locks it needs (an operator asked for it now).

-- name: share_customer_for_erasure
-- After share_customers for this customer (a decision's lock: it waits for a console change
-- or the customer's erasure), so this read sees what they wrote.
SELECT customer_id, erased_at FROM customers WHERE customer_id = $1;

-- name: lock_customer_for_erasure
-- A whole customer's erasure or hold, after lock_customer_key: waits for its license
-- decisions in progress and holds off new ones, as a console change does; the row lock keeps
-- the purge away (lock_customer).
SELECT customer_id, erased_at FROM customers WHERE customer_id = $1 FOR UPDATE;

-- name: holds_blocking
-- $1 customer, $2 user (NULL: any hold of the customer, for a whole customer's erasure).
SELECT scope FROM legal_holds
WHERE customer_id = $1
  AND (scope = 'customer' OR $2::text IS NULL OR subject_id = $2::text);

-- name: lock_user_for_erasure
-- The user's row: the lock of their license decisions (lock_group_users).
SELECT user_id, email, display_name FROM users
WHERE customer_id = $1 AND user_id = $2 AND purged_at IS NULL
FOR NO KEY UPDATE;

-- name: user_in_groups
SELECT EXISTS (SELECT FROM group_members WHERE customer_id = $1 AND user_id = $2);

-- name: lock_devices_of_user_for_erasure
SELECT device_id, hostname FROM devices
WHERE customer_id = $1 AND user_id = $2
ORDER BY device_id
FOR UPDATE;

-- name: device_user
-- Read without a lock: the caller locks the user, then the device, and checks it again.
SELECT user_id FROM devices WHERE customer_id = $1 AND device_id = $2;

-- name: lock_device_for_erasure
SELECT device_id, user_id, hostname FROM devices
WHERE customer_id = $1 AND device_id = $2
FOR UPDATE;

-- name: lock_users_of_customer_for_erasure
SELECT user_id, email, display_name FROM users
WHERE customer_id = $1 AND purged_at IS NULL
ORDER BY user_id
FOR NO KEY UPDATE;

-- name: lock_devices_of_customer_for_erasure
SELECT device_id, hostname FROM devices
WHERE customer_id = $1
ORDER BY device_id
FOR UPDATE;

-- name: active_licenses_of_customer
SELECT subject_type, subject_id FROM licenses
WHERE customer_id = $1 AND active
ORDER BY subject_type, subject_id;

-- name: unpublished_user_events
-- Events naming a user ($2; NULL: any user of customer $1) that billing has not received
-- yet: the erasure rewrites the user's id in the outbox, so it waits for them.
SELECT count(*) AS pending FROM license_outbox
WHERE customer_id = $1 AND published_at IS NULL AND subject_type = 'user'
  AND ($2::text IS NULL OR subject_id = $2::text);

-- name: inactivate_customer_for_erasure
-- Nothing of the customer is licensed again while its erasure waits for the relay.
UPDATE customers SET status = 'inactive', status_changed_at = $2
WHERE customer_id = $1 AND status = 'active';

-- name: detach_devices_of_users
-- $1 customers, $2 pseudonyms: an erased user's devices belong to nobody now (a device of a
-- purged pseudonym would otherwise be decided for a user whose license row is purged).
-- Each gets a device history row without a user, recorded at $3 (the erasure).
WITH detached AS (
    INSERT INTO device_history (
        customer_id, device_id, user_id, device_kind, protected, seen_at, recorded_at
    )
    SELECT d.customer_id, d.device_id, NULL, d.device_kind, coalesce(d.protected, false),
           d.last_seen_at,
           $3::timestamptz
    FROM devices AS d
    JOIN unnest($1::text[], $2::text[]) AS p (customer_id, user_id)
        ON d.customer_id = p.customer_id AND d.user_id = p.user_id
)
UPDATE devices AS d
SET user_id = NULL
FROM unnest($1::text[], $2::text[]) AS p (customer_id, user_id)
WHERE d.customer_id = p.customer_id AND d.user_id = p.user_id;

-- name: delete_group_members_of_customer
DELETE FROM group_members WHERE customer_id = $1;

-- name: mark_customer_erased
-- The tombstone: inactive, nameless, erased (the trigger of migration 0009 keeps it so).
UPDATE customers SET status = 'inactive', name = NULL, erased_at = $2
WHERE customer_id = $1 AND erased_at IS NULL;

-- name: set_legal_hold
-- Returns the hold, new or already there (then `created` is false).
WITH inserted AS (
    INSERT INTO legal_holds (customer_id, scope, subject_id) VALUES ($1, $2, $3)
    ON CONFLICT (customer_id, scope, subject_id) DO NOTHING
    RETURNING held_at, held_by
)
SELECT held_at, held_by, true AS created FROM inserted
UNION ALL
SELECT held_at, held_by, false FROM legal_holds
WHERE customer_id = $1 AND scope = $2 AND subject_id = $3
  AND NOT EXISTS (SELECT FROM inserted);

-- name: lift_legal_hold
DELETE FROM legal_holds WHERE customer_id = $1 AND scope = $2 AND subject_id = $3
RETURNING held_at;

-- name: record_erasure_audit
-- $1 action, $2 scope, $3 customer, $4 subject hash, $5 removed (table -> rows), $6 rows,
-- $7 time, $8 note. The requester is the database session user.
INSERT INTO erasure_audit (
    action, scope, customer_id, subject_hash, removed, rows_removed, recorded_at, note
)
VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8)
RETURNING id, requested_by, recorded_at;

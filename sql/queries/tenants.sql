-- Administrative events (tenant.admin.v1; worker/tenants/). Every change carries the
-- console's event time and is applied only if it is not older than the stored one.
-- Row locks follow the one lock order stated at the top of licensing.sql.

-- name: lock_customer_key
-- The exclusive side of the customer's advisory lock (key: share_customers): a console change
-- or an erasure waits for the decisions in progress for this customer and holds off new ones.
SELECT pg_advisory_xact_lock(773629486, hashtext($1::text));

-- name: lock_customer
-- After lock_customer_key: the row too, so that the purge, which skips locked customers
-- instead of waiting (purge.sql), leaves this customer alone. Console changes are rare; no
-- decision locks this row, so it never becomes a multixact of theirs.
SELECT customer_id FROM customers WHERE customer_id = $1 FOR UPDATE;

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

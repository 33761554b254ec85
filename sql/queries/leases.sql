-- Leader leases (worker/db/leases.py, migration 0014): one row per role ('sweeper', 'relay').
-- The database's clock decides expiry (clock_timestamp(): also after waiting for a row lock),
-- so replicas' clocks, and the settable clocks of tests, play no part.

-- name: take_lease
-- $1 the lease, $2 the taker, $3 how long. Taken when expired, or renewed when already the
-- taker's; a new holder gets a new token. Waits for a transaction of the holder that checked
-- the lease (lease_held, FOR SHARE): a takeover never overlaps the old leader's work.
UPDATE leases
SET holder = $2, expires_at = clock_timestamp() + $3::interval,
    token = CASE WHEN holder IS NOT DISTINCT FROM $2 THEN token ELSE token + 1 END
WHERE name = $1 AND (holder = $2 OR expires_at <= clock_timestamp())
RETURNING token;

-- name: renew_lease
-- $1 the lease, $2 its holder, $3 the token it was taken with, $4 how long from now.
UPDATE leases SET expires_at = clock_timestamp() + $4::interval
WHERE name = $1 AND holder = $2 AND token = $3
RETURNING token;

-- name: release_lease
-- A leader that stops gives its lease up at once (the next taker gets a new token).
UPDATE leases SET expires_at = '-infinity'
WHERE name = $1 AND holder = $2 AND token = $3;

-- name: lease_held
-- First statement of every transaction of a leader's work: a row only while the lease is
-- still this holder's, under this token, and not expired. FOR SHARE holds it until the
-- transaction ends, so no other replica takes the lease while this work may still commit.
SELECT token FROM leases
WHERE name = $1 AND holder = $2 AND token = $3 AND expires_at > clock_timestamp()
FOR SHARE;

-- Rule 5 for users who never held a license of their own (customers on the device model,
-- users first seen while their customer was inactive): their personal data is purged once
-- they have been silent for the release window plus the retention, as if their license had
-- been released when they fell silent. `purged_at` marks every purged user, so a pseudonym
-- is never purged twice.

ALTER TABLE users
    ADD COLUMN purged_at timestamptz,
    -- Day-granular, like devices.last_seen_day: a heartbeat changes it at most once a day,
    -- so the index below does not cost heartbeats their HOT updates.
    ADD COLUMN last_seen_day date
        GENERATED ALWAYS AS ((last_seen_at AT TIME ZONE 'UTC')::date) STORED;

CREATE INDEX users_unpurged_by_last_seen_day ON users (last_seen_day, customer_id, user_id)
    WHERE purged_at IS NULL;

-- Users purged before this migration (their id is already the pseudonym).
UPDATE users AS u
SET purged_at = l.purged_at
FROM licenses AS l
WHERE l.customer_id = u.customer_id AND l.subject_type = 'user' AND l.subject_id = u.user_id
  AND l.purged_at IS NOT NULL;

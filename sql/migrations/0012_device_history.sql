-- A device's user, kind and install state over time, for `report usage --as-of` (issue #18,
-- part 7; docs/licensing.md, "Usage report"). One row each time one of them changes, written
-- by the device upsert itself (sql/queries/ingest.sql, upsert_devices) from the rows it
-- returns and their before-image: never one per heartbeat. `recorded_at` is the service's
-- clock when the change was stored (the clock of license_history.decided_at), `seen_at` the
-- device's newest signal then (event time), so an as-of report knows a signal at or before
-- its time. `user_id` is personal data: the purge and erasure replace it by the user's
-- pseudonym (sql/queries/purge.sql, purge_users), and an erasure's detaching of devices
-- appends a row without a user.
CREATE TABLE device_history (
    id           bigserial PRIMARY KEY,
    customer_id  text NOT NULL,
    device_id    text NOT NULL,
    user_id      text,
    device_kind  text,
    protected    boolean NOT NULL,  -- false for a device only ever seen uninstalled (devices: NULL)
    seen_at      timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL,
    FOREIGN KEY (customer_id, device_id) REFERENCES devices (customer_id, device_id)
);

-- The as-of report: each device's latest row recorded by then.
CREATE INDEX device_history_by_device ON device_history (customer_id, device_id, recorded_at, id);
-- The purge: a user's rows.
CREATE INDEX device_history_by_user ON device_history (customer_id, user_id)
    WHERE user_id IS NOT NULL;

-- Devices stored before this migration: their state now, recorded now. An as-of report of
-- an earlier time shows their license state without user, kind or last seen, as before.
INSERT INTO device_history (
    customer_id, device_id, user_id, device_kind, protected, seen_at, recorded_at
)
SELECT customer_id, device_id, user_id, device_kind, coalesce(protected, false), last_seen_at,
       now()
FROM devices
ORDER BY customer_id, device_id;

-- A heartbeat changes last_seen_at and nothing else that is indexed, so Postgres can update
-- the row in place (a HOT update: no index writes) if no index covers last_seen_at and the
-- page has room. The sweeper's scan moves to a day-granular column, which a heartbeat
-- changes at most once a day.

ALTER TABLE devices
    ADD COLUMN last_seen_day date
        GENERATED ALWAYS AS ((last_seen_at AT TIME ZONE 'UTC')::date) STORED;

DROP INDEX devices_protected_by_last_seen;
DROP INDEX devices_customer_protected_by_last_seen;

CREATE INDEX devices_protected_by_last_seen_day ON devices (last_seen_day, customer_id, device_id)
    WHERE protected;
CREATE INDEX devices_customer_protected_by_last_seen_day ON devices (customer_id, last_seen_day)
    WHERE protected;

-- Room on each page for the new versions of its rows.
ALTER TABLE devices SET (fillfactor = 80);
ALTER TABLE users SET (fillfactor = 80);

-- What operators and metrics read: the `summary` command's counts and the license totals
-- the sweeper exports as metrics.

-- name: summary
SELECT
    (SELECT count(*) FROM customers) AS customers,
    (SELECT count(*) FROM users) AS users,
    (SELECT count(*) FROM devices) AS devices,
    (SELECT count(*) FROM devices WHERE protected) AS protected_devices,
    (SELECT count(*) FROM devices WHERE NOT protected) AS uninstalled_devices,
    (SELECT count(*) FROM device_lifecycle_events) AS lifecycle_events,
    (SELECT max(last_seen_at) FROM devices) AS newest_signal_at,
    (SELECT max(last_message_at) FROM ingestion_progress) AS newest_message_stored_at;

-- name: license_totals
-- Totals for the metrics: licenses in use by subject type and basis, and customers holding
-- any. Per-customer figures are the usage report's business, not a metric's.
SELECT subject_type, basis, count(*) AS licenses,
       count(DISTINCT customer_id) AS customers
FROM licenses
WHERE active
GROUP BY subject_type, basis;

-- name: customers_with_licenses
SELECT count(DISTINCT customer_id) AS customers FROM licenses WHERE active;

-- name: connected_as_superuser
-- Whether DATABASE_URL's role is a superuser: a weak setting (worker/weak_settings.py).
SELECT rolsuper FROM pg_roles WHERE rolname = current_user;

-- name: read_database_status
-- Where `report usage` and `reconcile` read from READ_DATABASE_URL: whether that server is a
-- replica, the age of the last transaction it replayed (NULL: none replayed since it
-- started; on an idle primary this grows although nothing is missing), and whether it has
-- replayed all the WAL it received.
SELECT pg_is_in_recovery() AS in_recovery,
       extract(epoch FROM now() - pg_last_xact_replay_timestamp()) AS replay_lag_seconds,
       CASE WHEN pg_is_in_recovery()
            THEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn()
       END AS replay_caught_up;

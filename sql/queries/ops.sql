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

-- The usage report (`license-worker report usage`, worker/report/build.py). Every query takes
-- $1 = one customer id, or NULL for all customers. Customers are ordered byte-wise
-- (COLLATE "C") in every query, so the rows of each customer follow its header in the
-- stream whatever the database's collation.

-- name: report_customers
-- $2: the as-of time (NULL: live). An all-customers as-of report lists the customers known
-- by then: first seen by then, or with a license decision by then. One named customer is
-- listed whatever its age (its report is then empty).
SELECT c.customer_id, c.name, c.status, c.license_model
FROM customers AS c
WHERE ($1::text IS NULL OR c.customer_id = $1)
  AND (
      $1::text IS NOT NULL
      OR $2::timestamptz IS NULL
      OR c.first_seen_at <= $2
      OR EXISTS (
          SELECT 1 FROM license_history AS h
          WHERE h.customer_id = c.customer_id AND h.decided_at <= $2
      )
  )
ORDER BY c.customer_id COLLATE "C";

-- name: report_live_counts
-- Active licenses by customer, subject type, basis and package: the live report's totals,
-- counted from the license rows alone (not from the detail query).
SELECT customer_id, subject_type, basis, package, count(*) AS licenses
FROM licenses
WHERE active AND ($1::text IS NULL OR customer_id = $1)
GROUP BY customer_id, subject_type, basis, package
ORDER BY customer_id COLLATE "C";

-- name: report_live_rows
-- Every user and every device, with the license it holds (or last held) and the facts that
-- explain why not. $2: the start of the release window (now - window): a device counts when
-- protected and seen after it. Each user comes before their devices, devices without a user
-- last. devices_covered: the user's counting devices that hold no license of their own.
WITH chosen AS (
    SELECT customer_id, status FROM customers
    WHERE $1::text IS NULL OR customer_id = $1
),
device_facts AS (
    SELECT d.customer_id, d.device_id, d.user_id, d.device_kind, d.protected, d.last_seen_at,
           c.status AS customer_status,
           l.active AS license_active, l.basis, l.package,
           d.protected AND d.last_seen_at > $2 AS counting
    FROM devices AS d
    JOIN chosen AS c USING (customer_id)
    LEFT JOIN licenses AS l
        ON l.customer_id = d.customer_id AND l.subject_type = 'device'
       AND l.subject_id = d.device_id
),
covered AS (
    SELECT customer_id, user_id, count(*) AS devices
    FROM device_facts
    WHERE user_id IS NOT NULL AND counting AND NOT coalesce(license_active, false)
    GROUP BY customer_id, user_id
),
report_rows AS (
    SELECT u.customer_id, 'user' AS subject_type, u.user_id AS subject_id, u.user_id,
           NULL::text AS device_kind, NULL::boolean AS protected, u.last_seen_at,
           c.status AS customer_status,
           l.active AS license_active, l.basis, l.package, l.release_reason, l.purged_at,
           NULL::boolean AS user_licensed,
           CASE WHEN l.active THEN coalesce(v.devices, 0) ELSE 0 END AS devices_covered
    FROM users AS u
    JOIN chosen AS c USING (customer_id)
    LEFT JOIN licenses AS l
        ON l.customer_id = u.customer_id AND l.subject_type = 'user' AND l.subject_id = u.user_id
    LEFT JOIN covered AS v ON v.customer_id = u.customer_id AND v.user_id = u.user_id
    UNION ALL
    SELECT f.customer_id, 'device', f.device_id, f.user_id,
           f.device_kind, f.protected, f.last_seen_at,
           f.customer_status,
           f.license_active, f.basis, f.package, NULL::text, NULL::timestamptz,
           coalesce(ul.active, false),
           NULL::bigint
    FROM device_facts AS f
    LEFT JOIN licenses AS ul
        ON ul.customer_id = f.customer_id AND ul.subject_type = 'user'
       AND ul.subject_id = f.user_id
)
SELECT * FROM report_rows
ORDER BY customer_id COLLATE "C", user_id COLLATE "C" NULLS LAST, subject_type DESC,
         subject_id COLLATE "C";

-- name: report_history_counts
-- $2: the as-of time. Each subject's latest license change decided by then; the subjects
-- whose latest change left them licensed, counted by kind and package.
WITH latest AS (
    SELECT DISTINCT ON (customer_id, subject_type, subject_id)
           customer_id, subject_type, subject_id, change, basis, package
    FROM license_history
    WHERE ($1::text IS NULL OR customer_id = $1) AND decided_at <= $2
    ORDER BY customer_id, subject_type, subject_id, decided_at DESC, id DESC
)
SELECT customer_id, subject_type, basis, package, count(*) AS licenses
FROM latest
WHERE change IN ('allocated', 'basis_changed', 'package_changed')
GROUP BY customer_id, subject_type, basis, package
ORDER BY customer_id COLLATE "C";

-- name: report_history_rows
-- $2: the as-of time. Every subject that held a license by then, with its latest change
-- decided by then; users first, then devices.
WITH latest AS (
    SELECT DISTINCT ON (customer_id, subject_type, subject_id)
           customer_id, subject_type, subject_id, change, basis, reason, package
    FROM license_history
    WHERE ($1::text IS NULL OR customer_id = $1) AND decided_at <= $2
    ORDER BY customer_id, subject_type, subject_id, decided_at DESC, id DESC
)
SELECT customer_id, subject_type, subject_id, change, basis, reason, package
FROM latest
ORDER BY customer_id COLLATE "C", subject_type DESC, subject_id COLLATE "C";

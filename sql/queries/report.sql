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
      OR EXISTS (
          SELECT 1 FROM license_history_baseline AS b
          WHERE b.customer_id = c.customer_id AND b.decided_at <= $2
      )
  )
ORDER BY c.customer_id COLLATE "C";

-- name: history_retained_from
-- Where the kept license history begins (migration 0015): the maintenance dropped what was
-- decided before it, keeping each subject's latest change in license_history_baseline. No
-- row: nothing was dropped. An as-of time before it cannot be replayed.
SELECT retained_from FROM partition_retention WHERE table_name = 'license_history';

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
-- $2: the as-of time. Each subject's latest license change decided by then (in the history,
-- or before the retained history in its baseline); the subjects whose latest change left
-- them licensed, counted by kind and package.
WITH latest AS (
    SELECT DISTINCT ON (customer_id, subject_type, subject_id)
           customer_id, subject_type, subject_id, change, basis, package
    FROM (
        SELECT * FROM license_history
        WHERE ($1::text IS NULL OR customer_id = $1) AND decided_at <= $2
        UNION ALL
        -- Each subject's latest change before the retained history (migration 0015).
        SELECT * FROM license_history_baseline
        WHERE ($1::text IS NULL OR customer_id = $1) AND decided_at <= $2
    ) AS kept
    ORDER BY customer_id, subject_type, subject_id, decided_at DESC, id DESC
)
SELECT customer_id, subject_type, basis, package, count(*) AS licenses
FROM latest
WHERE change IN ('allocated', 'basis_changed', 'package_changed')
GROUP BY customer_id, subject_type, basis, package
ORDER BY customer_id COLLATE "C";

-- name: report_history_rows
-- $2: the as-of time. Users and devices as they stood then (docs/licensing.md, "Usage
-- report"): every subject that held a license by then, with its latest change decided by
-- then (license_history, decided_at), and every device stored by then with its latest
-- user, kind and install state recorded by then (device_history, recorded_at: the same
-- clock), and the users those devices named. last_seen_at: a device's newest signal at or
-- before $2 that is stored anywhere (its last signal today if that is not after $2: then
-- exact; else the newest of its history rows' signals and its first sighting at or before
-- $2, a lower bound, since heartbeats that changed nothing are not kept); a user's: the
-- newest of its devices then. Ordered as the live report: each user before their devices,
-- devices without a user last.
WITH latest AS (
    SELECT DISTINCT ON (customer_id, subject_type, subject_id)
           customer_id, subject_type, subject_id, change, basis, reason, package
    FROM (
        SELECT * FROM license_history
        WHERE ($1::text IS NULL OR customer_id = $1) AND decided_at <= $2
        UNION ALL
        -- Each subject's latest change before the retained history (migration 0015).
        SELECT * FROM license_history_baseline
        WHERE ($1::text IS NULL OR customer_id = $1) AND decided_at <= $2
    ) AS kept
    ORDER BY customer_id, subject_type, subject_id, decided_at DESC, id DESC
),
attributes AS (
    SELECT DISTINCT ON (customer_id, device_id)
           customer_id, device_id, user_id, device_kind, protected
    FROM device_history
    WHERE ($1::text IS NULL OR customer_id = $1) AND recorded_at <= $2
    ORDER BY customer_id, device_id, recorded_at DESC, id DESC
),
signals AS (
    SELECT customer_id, device_id, max(seen_at) AS seen_at
    FROM device_history
    WHERE ($1::text IS NULL OR customer_id = $1) AND seen_at <= $2
    GROUP BY customer_id, device_id
),
devices_then AS (
    SELECT a.customer_id, a.device_id, a.user_id, a.device_kind, a.protected,
           CASE WHEN d.last_seen_at <= $2 THEN d.last_seen_at
                ELSE greatest(s.seen_at,
                              CASE WHEN d.first_seen_at <= $2 THEN d.first_seen_at END)
           END AS last_seen_at,
           d.last_seen_at <= $2 AS last_seen_exact
    FROM attributes AS a
    JOIN devices AS d USING (customer_id, device_id)
    LEFT JOIN signals AS s USING (customer_id, device_id)
),
users_then AS (
    SELECT customer_id, user_id, max(last_seen_at) AS last_seen_at,
           bool_and(last_seen_exact) AS last_seen_exact
    FROM devices_then
    WHERE user_id IS NOT NULL
    GROUP BY customer_id, user_id
),
user_rows AS (
    SELECT coalesce(l.customer_id, u.customer_id) AS customer_id, 'user' AS subject_type,
           coalesce(l.subject_id, u.user_id) AS subject_id,
           coalesce(l.subject_id, u.user_id) AS user_id,
           NULL::text AS device_kind, NULL::boolean AS protected,
           u.last_seen_at, u.last_seen_exact,
           l.change, l.basis, l.reason, l.package, NULL::boolean AS user_licensed
    FROM (SELECT * FROM latest WHERE subject_type = 'user') AS l
    FULL JOIN users_then AS u
        ON u.customer_id = l.customer_id AND u.user_id = l.subject_id
),
device_rows AS (
    SELECT coalesce(l.customer_id, t.customer_id) AS customer_id, 'device' AS subject_type,
           coalesce(l.subject_id, t.device_id) AS subject_id, t.user_id,
           t.device_kind, t.protected, t.last_seen_at, t.last_seen_exact,
           l.change, l.basis, l.reason, l.package,
           coalesce(ul.change IN ('allocated', 'basis_changed', 'package_changed'), false)
               AS user_licensed
    FROM (SELECT * FROM latest WHERE subject_type = 'device') AS l
    FULL JOIN devices_then AS t
        ON t.customer_id = l.customer_id AND t.device_id = l.subject_id
    LEFT JOIN latest AS ul
        ON ul.customer_id = t.customer_id AND ul.subject_type = 'user'
       AND ul.subject_id = t.user_id
),
report_rows AS (
    SELECT * FROM user_rows
    UNION ALL
    SELECT * FROM device_rows
)
SELECT * FROM report_rows
ORDER BY customer_id COLLATE "C", user_id COLLATE "C" NULLS LAST, subject_type DESC,
         subject_id COLLATE "C";

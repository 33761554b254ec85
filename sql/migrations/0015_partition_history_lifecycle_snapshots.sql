-- license_history, device_lifecycle_events and usage_snapshots, range-partitioned by month
-- (issue #15 part 3; docs/scaling.md "Partitioning and retention"), so that a retention drops
-- whole partitions instead of deleting rows. The partition key of each is the time its
-- readers filter on and that its unique keys can include:
-- - license_history: decided_at (the service's clock when the change was stored; the as-of
--   report replays the history `decided_at <= T`). The primary key becomes
--   (customer_id, decided_at, id): it leads with the customer (Citus), includes the key, and
--   serves the as-of report's scan, so license_history_by_customer_decided goes.
-- - device_lifecycle_events: occurred_at (the event's time, clamped to the receive time plus
--   FUTURE_TOLERANCE by ingestion). The key that recognises a redelivered event becomes
--   (customer_id, event_id, occurred_at): a redelivered event carries the same time, so the
--   conflict still finds it (insert_lifecycle_events also checks the event id alone).
--   recorded_at would differ at each delivery and could not be part of that key.
-- - usage_snapshots: day, already in its key (customer_id, day).
-- Each table gets a DEFAULT partition: a row whose month has no partition (a far-future
-- server clock, an agent clock reset to 1970) is kept there, never refused; the maintenance
-- moves it into its month's partition once that month is within the kept range, or deletes
-- it once it is older than the retention.
--
-- The history older than the retention is folded, before it goes, into
-- license_history_baseline: each subject's latest change decided before the retained range.
-- So `report usage --as-of T` stays exact for every T in the retained range (the latest
-- change by T is in the baseline or the history) and refuses earlier T
-- (partition_retention.retained_from).
--
-- What this migration locks, for how long, and how to run it online instead:
-- docs/migrations.md (0015). The three tables are locked ACCESS EXCLUSIVE (reads wait too)
-- for the whole migration: the copy, the key builds and the foreign keys' validation.

-- Month boundaries are UTC months, whatever the migrating session's time zone.
SET LOCAL timezone = 'UTC';

-- All three at once, in one wait bounded by the lock timeout, before anything is changed:
-- the renames below take ACCESS EXCLUSIVE anyway, held until the migration commits.
LOCK TABLE license_history, device_lifecycle_events, usage_snapshots IN ACCESS EXCLUSIVE MODE;

-- The old tables keep their data until the copy is done; the new ones take their names.
-- Renamed and dropped below, in this transaction, once its rows are copied: no reader sees
-- the intermediate names.
-- squawk-ignore renaming-table
ALTER TABLE license_history RENAME TO license_history_unpartitioned;
-- squawk-ignore renaming-table
ALTER TABLE device_lifecycle_events RENAME TO device_lifecycle_events_unpartitioned;
-- squawk-ignore renaming-table
ALTER TABLE usage_snapshots RENAME TO usage_snapshots_unpartitioned;

-- Same columns, defaults (the id sequence included) and CHECKs; keys and indexes are built
-- after the copy (one bulk build each, faster than maintaining them row by row).
CREATE TABLE license_history (
    LIKE license_history_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS
) PARTITION BY RANGE (decided_at);
CREATE TABLE device_lifecycle_events (
    LIKE device_lifecycle_events_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS
) PARTITION BY RANGE (occurred_at);
CREATE TABLE usage_snapshots (
    LIKE usage_snapshots_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS
) PARTITION BY RANGE (day);

CREATE TABLE license_history_default PARTITION OF license_history DEFAULT;
CREATE TABLE device_lifecycle_events_default PARTITION OF device_lifecycle_events DEFAULT;
CREATE TABLE usage_snapshots_default PARTITION OF usage_snapshots DEFAULT;

-- Each subject's latest history row decided before the retained range (see above). The same
-- columns as license_history, so that a reader can take the union of both.
CREATE TABLE license_history_baseline (LIKE license_history_unpartitioned);
ALTER TABLE license_history_baseline
    ADD PRIMARY KEY (customer_id, subject_type, subject_id);

-- Where the kept rows of each partitioned table begin, once the maintenance has removed
-- older ones (no row: nothing removed yet, the table is complete).
CREATE TABLE partition_retention (
    table_name     text PRIMARY KEY
        CHECK (table_name IN ('license_history', 'device_lifecycle_events', 'usage_snapshots')),
    retained_from  timestamptz NOT NULL,
    changed_at     timestamptz NOT NULL DEFAULT now()
);

-- The month's partition of `parent` (one of the three), starting at `month_start` (a UTC
-- month's first instant). Rows of that month waiting in the DEFAULT partition are moved into
-- it (Postgres refuses a new partition while the default holds rows of its range). Returns
-- the rows moved; nothing if the partition exists. Not granted to anyone: called by the
-- owner (this migration) and by maintain_partitions.
CREATE FUNCTION create_month_partition(parent text, month_start timestamptz)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = public, pg_temp
SET timezone = 'UTC'
AS $create$
DECLARE
    key_column text := CASE parent
        WHEN 'license_history' THEN 'decided_at'
        WHEN 'device_lifecycle_events' THEN 'occurred_at'
        WHEN 'usage_snapshots' THEN 'day' END;
    partition_name text := parent || '_p' || to_char(month_start, 'YYYYMM');
    default_name text := parent || '_default';
    lower_bound text;
    upper_bound text;
    waiting boolean;
    moved bigint;
BEGIN
    IF key_column IS NULL OR month_start IS NULL
       OR month_start <> date_trunc('month', month_start) THEN
        RAISE EXCEPTION 'no monthly partition of % at %', parent, month_start
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF to_regclass(format('public.%I', partition_name)) IS NOT NULL THEN
        RETURN 0;
    END IF;
    IF parent = 'usage_snapshots' THEN
        lower_bound := quote_literal(month_start::date);
        upper_bound := quote_literal((month_start + interval '1 month')::date);
    ELSE
        lower_bound := quote_literal(month_start);
        upper_bound := quote_literal(month_start + interval '1 month');
    END IF;
    EXECUTE format('SELECT EXISTS (SELECT FROM public.%I WHERE %I >= %s AND %I < %s)',
                   default_name, key_column, lower_bound, key_column, upper_bound)
        INTO waiting;
    IF NOT waiting THEN
        EXECUTE format('CREATE TABLE public.%I PARTITION OF public.%I FOR VALUES FROM (%s) TO (%s)',
                       partition_name, parent, lower_bound, upper_bound);
        RETURN 0;
    END IF;
    EXECUTE format('CREATE TABLE public.%I '
                   '(LIKE public.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                   partition_name, parent);
    EXECUTE format('WITH moved AS (DELETE FROM public.%I WHERE %I >= %s AND %I < %s RETURNING *) '
                   'INSERT INTO public.%I SELECT * FROM moved',
                   default_name, key_column, lower_bound, key_column, upper_bound,
                   partition_name);
    GET DIAGNOSTICS moved = ROW_COUNT;
    EXECUTE format('ALTER TABLE public.%I ATTACH PARTITION public.%I FOR VALUES FROM (%s) TO (%s)',
                   parent, partition_name, lower_bound, upper_bound);
    RETURN moved;
END
$create$;

REVOKE ALL ON FUNCTION create_month_partition(text, timestamptz) FROM PUBLIC;

-- The partitions of the existing data: every month from the oldest row's (at most 36 months
-- back: older rows wait in the default partition, where the first maintenance folds and
-- deletes them or moves them into partitions, as the retention says) to three months ahead.
DO $partitions$
DECLARE
    parent text;
    oldest timestamptz;
    this_month timestamptz := date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    month_start timestamptz;
BEGIN
    FOREACH parent IN ARRAY ARRAY['license_history', 'device_lifecycle_events',
                                  'usage_snapshots'] LOOP
        EXECUTE format('SELECT min(%I)::timestamptz FROM public.%I',
                       CASE parent WHEN 'license_history' THEN 'decided_at'
                                   WHEN 'device_lifecycle_events' THEN 'occurred_at'
                                   ELSE 'day' END,
                       parent || '_unpartitioned')
            INTO oldest;
        month_start := greatest(
            date_trunc('month', coalesce(oldest, now()) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
            this_month - interval '36 months'
        );
        month_start := least(month_start, this_month);
        WHILE month_start <= this_month + interval '3 months' LOOP
            PERFORM create_month_partition(parent, month_start);
            month_start := month_start + interval '1 month';
        END LOOP;
    END LOOP;
END
$partitions$;

INSERT INTO license_history SELECT * FROM license_history_unpartitioned;
INSERT INTO device_lifecycle_events SELECT * FROM device_lifecycle_events_unpartitioned;
INSERT INTO usage_snapshots SELECT * FROM usage_snapshots_unpartitioned;

-- The privileges of the old tables, table-wide and per column, go to the new ones: the
-- worker keeps writing between `migrate` and `create-roles` (which grants them anyway).
DO $privileges$
DECLARE
    parent text;
    granted record;
BEGIN
    FOREACH parent IN ARRAY ARRAY['license_history', 'device_lifecycle_events',
                                  'usage_snapshots'] LOOP
        FOR granted IN
            SELECT a.privilege_type, a.grantee
            FROM pg_class AS c, aclexplode(c.relacl) AS a
            WHERE c.oid = format('public.%I', parent || '_unpartitioned')::regclass
              AND a.grantee <> c.relowner AND a.grantee <> 0
        LOOP
            EXECUTE format('GRANT %s ON public.%I TO %I', granted.privilege_type, parent,
                           granted.grantee::regrole::text);
        END LOOP;
        FOR granted IN
            SELECT a.privilege_type, a.grantee, att.attname
            FROM pg_attribute AS att, aclexplode(att.attacl) AS a
            WHERE att.attrelid = format('public.%I', parent || '_unpartitioned')::regclass
              AND a.grantee <> 0
        LOOP
            EXECUTE format('GRANT %s (%I) ON public.%I TO %I', granted.privilege_type,
                           granted.attname, parent, granted.grantee::regrole::text);
        END LOOP;
    END LOOP;
END
$privileges$;

-- The id sequence outlives the old table (the new one's default draws from it).
ALTER SEQUENCE license_history_id_seq OWNED BY NONE;
-- Their rows were copied above, in this transaction.
-- squawk-ignore ban-drop-table
DROP TABLE license_history_unpartitioned;
-- squawk-ignore ban-drop-table
DROP TABLE device_lifecycle_events_unpartitioned;
-- squawk-ignore ban-drop-table
DROP TABLE usage_snapshots_unpartitioned;
ALTER SEQUENCE license_history_id_seq OWNED BY license_history.id;

-- Keys and indexes, built once over the copied rows (on each partition, and on those the
-- maintenance creates later). The old license_history_by_customer_decided is the new
-- primary key.
ALTER TABLE license_history ADD PRIMARY KEY (customer_id, decided_at, id);
CREATE INDEX license_history_by_subject ON license_history (customer_id, subject_type, subject_id);
ALTER TABLE device_lifecycle_events ADD PRIMARY KEY (customer_id, event_id, occurred_at);
ALTER TABLE usage_snapshots ADD PRIMARY KEY (customer_id, day);
-- A validating foreign key (partitioned tables take no NOT VALID one in Postgres 15): one
-- join of the copied rows with devices and customers; SHARE ROW EXCLUSIVE on those until
-- the migration commits (their writers wait; docs/migrations.md).
ALTER TABLE device_lifecycle_events
    ADD FOREIGN KEY (customer_id, device_id) REFERENCES devices (customer_id, device_id);
ALTER TABLE usage_snapshots ADD FOREIGN KEY (customer_id) REFERENCES customers (customer_id);

-- Folds the history rows of `source` (a partition of license_history) decided before
-- `before` into license_history_baseline: each subject's latest one replaces an older
-- baseline row. With `remove`, those rows are deleted from `source` in the same statement.
-- Returns the rows read. Not granted to anyone: called by maintain_partitions.
CREATE FUNCTION fold_into_license_history_baseline(
    source text, before timestamptz, remove boolean DEFAULT false
)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $fold$
DECLARE
    folded bigint;
    rows_read text := CASE WHEN remove
        THEN format('DELETE FROM public.%I WHERE decided_at < %L RETURNING *', source, before)
        ELSE format('SELECT * FROM public.%I WHERE decided_at < %L', source, before) END;
BEGIN
    EXECUTE format($sql$
        WITH old AS (%s),
        latest AS (
            SELECT DISTINCT ON (customer_id, subject_type, subject_id) *
            FROM old
            ORDER BY customer_id, subject_type, subject_id, decided_at DESC, id DESC
        ),
        kept AS (
            INSERT INTO public.license_history_baseline AS b SELECT * FROM latest
            ON CONFLICT (customer_id, subject_type, subject_id) DO UPDATE SET
                id = EXCLUDED.id, change = EXCLUDED.change, basis = EXCLUDED.basis,
                reason = EXCLUDED.reason, effective_at = EXCLUDED.effective_at,
                decided_at = EXCLUDED.decided_at, event_id = EXCLUDED.event_id,
                package = EXCLUDED.package
            WHERE (EXCLUDED.decided_at, EXCLUDED.id) > (b.decided_at, b.id)
            RETURNING 1
        )
        SELECT count(*) FROM old
    $sql$, rows_read) INTO folded;
    RETURN folded;
END
$fold$;

REVOKE ALL ON FUNCTION fold_into_license_history_baseline(text, timestamptz, boolean)
    FROM PUBLIC;

-- Creates the partitions `months_ahead` months ahead of `as_of` (the caller's clock: the
-- sweeper's, settable in tests) and drops those wholly older than `retention`: a partition
-- whose upper bound is at or before the first instant of the month of `as_of - retention`
-- (retained_from). Rows of the DEFAULT partition older than that are deleted; rows of a kept
-- month are moved into its partition. History rows are folded into license_history_baseline
-- before they go. The retention's start is recorded in partition_retention once anything
-- older went.
--
-- The worker role has no DDL and no DELETE on these tables (docs/security.md "Least
-- privilege"); it may only call this function. Runs as its owner (the migrating role) with a
-- fixed search path; it touches only the three tables named here and their partitions (by
-- their catalogue entries, never by a name the caller gives), takes a clock more than a day
-- ahead of the database's as the database's plus a day (a clock ahead would drop what the
-- retention keeps; tests move the sweeper's clock ahead freely), and refuses a retention
-- under two months and more than 24 months ahead. Waits at most 5 s for a lock
-- (then fails, and the next pass tries again) so that ingestion never queues behind it.
CREATE FUNCTION maintain_partitions(
    parent text, as_of timestamptz, retention interval, months_ahead integer
)
RETURNS TABLE (created integer, dropped integer, moved bigint, deleted bigint,
               retained_from timestamptz)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
SET timezone = 'UTC'
SET lock_timeout = '5s'
AS $maintain$
DECLARE
    key_column text := CASE parent
        WHEN 'license_history' THEN 'decided_at'
        WHEN 'device_lifecycle_events' THEN 'occurred_at'
        WHEN 'usage_snapshots' THEN 'day' END;
    default_name text := parent || '_default';
    cutoff timestamptz;
    cutoff_literal text;
    this_month timestamptz;
    month_start timestamptz;
    part record;
    count_now bigint;
BEGIN
    IF key_column IS NULL THEN
        RAISE EXCEPTION 'maintain_partitions: not a partitioned table of the service'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF as_of IS NULL THEN
        RAISE EXCEPTION 'maintain_partitions: no time given'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    as_of := least(as_of, now() + interval '1 day');
    IF retention IS NULL OR retention < interval '2 months' THEN
        RAISE EXCEPTION 'maintain_partitions: a retention must be at least two months, not %',
            retention USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF months_ahead IS NULL OR months_ahead < 1 OR months_ahead > 24 THEN
        RAISE EXCEPTION 'maintain_partitions: 1 to 24 months ahead, not %', months_ahead
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    created := 0; dropped := 0; moved := 0; deleted := 0;
    cutoff := date_trunc('month', as_of - retention);
    cutoff_literal := CASE parent WHEN 'usage_snapshots' THEN quote_literal(cutoff::date)
                                  ELSE quote_literal(cutoff) END;
    this_month := date_trunc('month', as_of);

    -- Whole partitions past the retention: folded (history), then dropped while attached:
    -- ACCESS EXCLUSIVE on the parent for a catalogue change. (DETACH first would make the
    -- partition's foreign key a constraint of its own, whose drop locks devices or
    -- customers ACCESS EXCLUSIVE: every ingestion batch would wait.)
    FOR part IN
        SELECT c.relname,
               (regexp_match(pg_get_expr(c.relpartbound, c.oid),
                             'TO \(''([^'']+)''\)'))[1]::timestamptz AS upper_bound
        FROM pg_inherits AS i
        JOIN pg_class AS c ON c.oid = i.inhrelid
        WHERE i.inhparent = format('public.%I', parent)::regclass
        ORDER BY 2
    LOOP
        CONTINUE WHEN part.upper_bound IS NULL OR part.upper_bound > cutoff;
        -- Writers of these rows (the purge's pseudonyms) wait until they are gone.
        EXECUTE format('LOCK TABLE public.%I IN SHARE MODE', part.relname);
        IF parent = 'license_history' THEN
            PERFORM fold_into_license_history_baseline(part.relname, cutoff);
        END IF;
        EXECUTE format('DROP TABLE public.%I', part.relname);
        dropped := dropped + 1;
    END LOOP;

    -- Rows of the default partition past the retention.
    IF parent = 'license_history' THEN
        deleted := fold_into_license_history_baseline(default_name, cutoff, remove => true);
    ELSE
        EXECUTE format('DELETE FROM public.%I WHERE %I < %s', default_name, key_column,
                       cutoff_literal);
        GET DIAGNOSTICS count_now = ROW_COUNT;
        deleted := count_now;
    END IF;

    -- Kept months waiting in the default partition, and the months ahead.
    FOR month_start IN
        EXECUTE format('SELECT DISTINCT date_trunc(''month'', %I::timestamptz) FROM public.%I '
                       'WHERE %I >= %s AND %I < %L', key_column, default_name, key_column,
                       cutoff_literal, key_column, this_month)
    LOOP
        IF to_regclass(format('public.%I', parent || '_p' || to_char(month_start, 'YYYYMM')))
           IS NULL THEN
            moved := moved + create_month_partition(parent, month_start);
            created := created + 1;
        END IF;
    END LOOP;
    FOR month_start IN
        SELECT generate_series(this_month, this_month + make_interval(months => months_ahead),
                               interval '1 month')
    LOOP
        IF to_regclass(format('public.%I', parent || '_p' || to_char(month_start, 'YYYYMM')))
           IS NULL THEN
            moved := moved + create_month_partition(parent, month_start);
            created := created + 1;
        END IF;
    END LOOP;

    IF dropped > 0 OR deleted > 0 THEN
        INSERT INTO public.partition_retention AS r (table_name, retained_from)
        VALUES (parent, cutoff)
        ON CONFLICT (table_name) DO UPDATE
            SET retained_from = greatest(r.retained_from, EXCLUDED.retained_from),
                changed_at = now();
    END IF;
    SELECT r.retained_from INTO maintain_partitions.retained_from
    FROM public.partition_retention AS r WHERE r.table_name = parent;
    RETURN NEXT;
END
$maintain$;

REVOKE ALL ON FUNCTION maintain_partitions(text, timestamptz, interval, integer) FROM PUBLIC;

ANALYZE license_history, device_lifecycle_events, usage_snapshots;

-- Partition maintenance that never deadlocks with ingestion (issue #15; found by the fault
-- run): maintain_partitions (migration 0015) is replaced by the same function that, when it
-- is to make a partition of a table with a foreign key, first locks the referenced table
-- (see the comment in the function). Only the function changes: no table is locked here.
CREATE OR REPLACE FUNCTION maintain_partitions(
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
    partition_to_make boolean;
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

    -- A partition made for a table with a foreign key locks the referenced table SHARE ROW
    -- EXCLUSIVE after the parent (device_lifecycle_events: devices; usage_snapshots:
    -- customers), while an ingestion batch holds devices (and customers) and then writes
    -- into the parent: the two deadlocked (found in the fault run). When a partition is to be
    -- made, the referenced table is locked first, before anything else: the maintenance
    -- waits for the batches (at most the lock timeout) and no batch waits for it holding a
    -- lock it needs. Dropping takes no lock on the referenced table and needs none.
    IF parent <> 'license_history' THEN
        SELECT EXISTS (
            SELECT FROM generate_series(this_month,
                                        this_month + make_interval(months => months_ahead),
                                        interval '1 month') AS m
            WHERE to_regclass(format('public.%I', parent || '_p' || to_char(m, 'YYYYMM')))
                  IS NULL
        ) INTO partition_to_make;
        IF NOT partition_to_make THEN
            EXECUTE format('SELECT EXISTS (SELECT FROM public.%I WHERE %I >= %s AND %I < %L)',
                           default_name, key_column, cutoff_literal, key_column, this_month)
                INTO partition_to_make;
        END IF;
        IF partition_to_make THEN
            EXECUTE format('LOCK TABLE public.%I IN SHARE ROW EXCLUSIVE MODE',
                           CASE parent WHEN 'device_lifecycle_events' THEN 'devices'
                                       ELSE 'customers' END);
        END IF;
    END IF;

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

-- Published license events leave the outbox after a retention (OUTBOX_RETENTION_DAYS; README,
-- docs/operations.md "Outbox retention"). Billing does not need them: the topic is the record
-- of what billing received, and `reconcile` reads the topic, the licenses and the history;
-- of the outbox it reads only rows not published yet (and the rows written during its own
-- read), which this function never deletes.
--
-- The worker role has no DELETE on license_outbox (the outbox is append-only but for the
-- relay's mark and the purge's rewrite, docs/security.md "Least privilege"); it may only
-- call this function. Runs as its owner (the migrating role); the search path is fixed so
-- that no object of the caller's can stand in for the table.
--
-- It deletes at most `max_rows` rows per call (one short transaction), and only among the
-- `max_rows` oldest rows by id: the cost of a call is bounded by the batch, not by the table,
-- even when nothing is due (rows are published in about id order; an older row still
-- unpublished keeps its place in the window and only narrows it). Only rows published
-- before `as_of - retention`: the caller's clock (the relay's, settable in tests). A
-- retention under one day is refused: a mistaken setting cannot empty the outbox of what was
-- published a moment ago. Returns the number of rows deleted.
--
-- Independent of any other migration: it creates one function and changes no table.
CREATE FUNCTION prune_published_license_events(
    as_of timestamptz, retention interval, max_rows integer
)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $prune$
DECLARE
    pruned integer;
BEGIN
    IF as_of IS NULL OR retention IS NULL OR retention < interval '1 day' THEN
        RAISE EXCEPTION 'the outbox retention must be at least one day, not %', retention
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF max_rows IS NULL OR max_rows < 1 OR max_rows > 10000 THEN
        RAISE EXCEPTION 'an outbox prune deletes 1 to 10000 rows per call, not %', max_rows
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    DELETE FROM public.license_outbox AS o
    WHERE o.id IN (
        SELECT oldest.id
        FROM (
            SELECT w.id, w.published_at
            FROM public.license_outbox AS w
            ORDER BY w.id
            LIMIT max_rows
        ) AS oldest
        WHERE oldest.published_at IS NOT NULL AND oldest.published_at < as_of - retention
    );
    GET DIAGNOSTICS pruned = ROW_COUNT;
    RETURN pruned;
END
$prune$;

REVOKE ALL ON FUNCTION prune_published_license_events(timestamptz, interval, integer) FROM PUBLIC;

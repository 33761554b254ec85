-- An allocation's event waits in the outbox until it has settled (ALLOCATION_SETTLE_SECONDS
-- after its decision, on the service's clock): a decision about the same subject before then
-- may withdraw it (docs/licensing.md, "Settled allocations"). NULL: publish at once (every
-- other event, and allocations when the window is 0).
ALTER TABLE license_outbox ADD COLUMN settles_at timestamptz;

-- The decisions look up a subject's unsettled allocation.
CREATE INDEX license_outbox_unsettled ON license_outbox (customer_id, subject_type, subject_id)
    WHERE published_at IS NULL AND settles_at IS NOT NULL;

-- Withdrawing a pending allocation deletes what billing never received: its outbox row, its
-- subject's history from it on, and the license row of a subject it was the first event of
-- (docs/licensing.md, "Settled allocations"). The worker role has no DELETE on these tables
-- (history is append-only, docs/security.md "Least privilege"); it may only call this
-- function, which deletes nothing but unpublished allocations still in their settle window
-- and what follows them, and refuses to touch anything billing has received. Runs as its
-- owner (the migrating role); the search path is fixed so that no object of the caller's
-- can stand in for a table. The caller holds the locks (licensing.sql: held_licenses, then
-- unsettled_allocations). Returns the withdrawn event ids.
CREATE FUNCTION withdraw_unsettled_allocations(event_ids uuid[])
RETURNS SETOF uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $withdraw$
DECLARE
    customers text[];
    subject_types text[];
    subjects text[];
    events uuid[];
BEGIN
    WITH withdrawn AS (
        DELETE FROM public.license_outbox AS o
        WHERE o.event_id = ANY(event_ids) AND o.published_at IS NULL
          AND o.settles_at IS NOT NULL AND o.payload->>'type' = 'license.allocated'
        RETURNING o.customer_id, o.subject_type, o.subject_id, o.event_id
    )
    SELECT array_agg(customer_id), array_agg(subject_type), array_agg(subject_id),
           array_agg(event_id)
    INTO customers, subject_types, subjects, events
    FROM withdrawn;
    IF events IS NULL THEN
        RETURN;
    END IF;

    IF EXISTS (
        SELECT FROM unnest(customers, subject_types, subjects, events)
                AS w (customer_id, subject_type, subject_id, event_id)
        JOIN public.license_history AS allocation
            ON allocation.customer_id = w.customer_id AND allocation.subject_type = w.subject_type
           AND allocation.subject_id = w.subject_id AND allocation.event_id = w.event_id
        JOIN public.license_history AS later
            ON later.customer_id = allocation.customer_id
           AND later.subject_type = allocation.subject_type
           AND later.subject_id = allocation.subject_id AND later.id >= allocation.id
        JOIN public.license_outbox AS sent
            ON sent.event_id = later.event_id AND sent.published_at IS NOT NULL
    ) THEN
        RAISE EXCEPTION 'a withdrawn allocation is followed by an event billing has received'
            USING ERRCODE = 'serialization_failure';
    END IF;

    DELETE FROM public.license_history AS h
    USING unnest(customers, subject_types, subjects, events)
              AS w (customer_id, subject_type, subject_id, event_id),
          public.license_history AS allocation
    WHERE allocation.customer_id = w.customer_id AND allocation.subject_type = w.subject_type
      AND allocation.subject_id = w.subject_id AND allocation.event_id = w.event_id
      AND h.customer_id = allocation.customer_id AND h.subject_type = allocation.subject_type
      AND h.subject_id = allocation.subject_id AND h.id >= allocation.id;

    -- A subject with no history left was never licensed as far as billing knows.
    DELETE FROM public.licenses AS l
    USING unnest(customers, subject_types, subjects)
              AS w (customer_id, subject_type, subject_id)
    WHERE l.customer_id = w.customer_id AND l.subject_type = w.subject_type
      AND l.subject_id = w.subject_id AND l.active AND l.event_sequence = 1
      AND NOT EXISTS (
          SELECT FROM public.license_history AS h
          WHERE h.customer_id = l.customer_id AND h.subject_type = l.subject_type
            AND h.subject_id = l.subject_id
      );

    RETURN QUERY SELECT unnest(events);
END
$withdraw$;

REVOKE ALL ON FUNCTION withdraw_unsettled_allocations(uuid[]) FROM PUBLIC;

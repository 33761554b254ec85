-- An allocation's event waits in the outbox until it has settled (ALLOCATION_SETTLE_SECONDS
-- after its decision, on the service's clock): a decision about the same subject before then
-- may withdraw it (docs/licensing.md, "Settled allocations"). NULL: publish at once (every
-- other event, and allocations when the window is 0).
ALTER TABLE license_outbox ADD COLUMN settles_at timestamptz;

-- The decisions look up a subject's unsettled allocation.
CREATE INDEX license_outbox_unsettled ON license_outbox (customer_id, subject_type, subject_id)
    WHERE published_at IS NULL AND settles_at IS NOT NULL;

-- Each license decision gets an event id of its own. The id used to be derived from the
-- subject and the effective time alone, so a subject allocated, released and allocated
-- again with an unchanged effective time (its newest signal did not move) got the first
-- allocation's id twice, and the outbox dropped the second one: billing never heard of it.
-- `event_sequence` numbers a subject's license events (allocated, released): 1 for its first,
-- one more for each next. It is part of the event id and of the event, so billing can order
-- a subject's events and see a gap, and the id stays the same when a decision lost with its
-- transaction is made again from the same stored state.

ALTER TABLE licenses ADD COLUMN event_sequence integer NOT NULL DEFAULT 0;

-- Subjects decided before this migration: the events they already had.
UPDATE licenses AS l
SET event_sequence = h.events
FROM (
    SELECT customer_id, subject_type, subject_id, count(*) AS events
    FROM license_history
    WHERE change IN ('allocated', 'released')
    GROUP BY customer_id, subject_type, subject_id
) AS h
WHERE l.customer_id = h.customer_id
  AND l.subject_type = h.subject_type
  AND l.subject_id = h.subject_id;

-- The pseudonym key leaves the database (issue #14, part 4): kept in service_keys it was in
-- every backup and readable, even replaceable, by the worker role. The worker now reads it
-- from PSEUDONYM_KEY_FILE only (docs/security.md, "The pseudonym key").
--
-- Upgrade: if users were purged, the key in service_keys made their pseudonyms. Dropping it
-- unexported would leave the operator unable to verify them, so this migration refuses
-- unless PSEUDONYM_KEY_FILE holds that same key: `license-worker migrate` sets
-- license.pseudonym_key_sha256 to the SHA-256 of the configured key (never the key).
-- Export it first, as the owner:
--   (umask 077; psql "$OWNER_DATABASE_URL" -Atc \
--       "SELECT value FROM service_keys WHERE name = 'pseudonym'" > pseudonym.key)
-- To discard it on purpose (PSEUDONYM_KEY was set before, so the database key was never
-- used, or the old pseudonyms need no verifying): DELETE FROM service_keys; as the owner.
DO $upgrade$
DECLARE
    stored text := (SELECT value FROM service_keys WHERE name = 'pseudonym');
BEGIN
    IF stored IS NOT NULL
       AND EXISTS (SELECT FROM users WHERE purged_at IS NOT NULL)
       AND encode(sha256(convert_to(stored, 'UTF8')), 'hex')
           IS DISTINCT FROM nullif(current_setting('license.pseudonym_key_sha256', true), '')
    THEN
        RAISE EXCEPTION 'the pseudonym key in service_keys made the pseudonyms of purged users '
                        'and PSEUDONYM_KEY_FILE does not hold it: export it to a file first '
                        '(see sql/migrations/0009_pseudonym_key_out_of_the_database.sql and '
                        'docs/security.md), set PSEUDONYM_KEY_FILE, then migrate again';
    END IF;
END
$upgrade$;

DROP TABLE service_keys;

-- License event ids were UUIDv5 of customer, type, subject, time and number under a namespace
-- written in the source: anyone could test a guessed user id against a stored id, before
-- and after the purge. New ids are keyed (worker/licensing/rules.py, license_event_id). The
-- published events of users keep no id of the old scheme here: each gets a random id, the
-- same in the history, the outbox column and the payload. Billing keeps the ids it received
-- (they are opaque to it; nothing here is published again). Rows not published yet keep
-- theirs: the relay may have sent them already without marking them, and billing
-- de-duplicates by id (docs/security.md, "The pseudonym key").
WITH legacy AS MATERIALIZED (
    SELECT event_id AS old_id, gen_random_uuid() AS new_id
    FROM license_outbox
    WHERE subject_type = 'user' AND published_at IS NOT NULL
      AND substr(event_id::text, 15, 1) = '5'
),
history_done AS (
    UPDATE license_history AS h
    SET event_id = l.new_id
    FROM legacy AS l
    WHERE h.event_id = l.old_id
)
UPDATE license_outbox AS o
SET event_id = l.new_id,
    payload = jsonb_set(o.payload, '{event_id}', to_jsonb(l.new_id::text))
FROM legacy AS l
WHERE o.event_id = l.old_id;

-- A confirmation of releases the outage guard held names the database login that made it
-- (session_user), not free text: whatever a statement writes into confirmed_by, this
-- trigger records session_user when the hold is confirmed, and refuses to rewrite a
-- confirmation afterwards. An optional free-text note (a ticket) goes beside it.
ALTER TABLE sweep_holds ADD COLUMN confirmation_note text;

CREATE FUNCTION sweep_holds_record_confirmer() RETURNS trigger
LANGUAGE plpgsql AS $confirmer$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.confirmed_at IS DISTINCT FROM OLD.confirmed_at THEN
        NEW.confirmed_by := CASE WHEN NEW.confirmed_at IS NULL THEN NULL ELSE session_user END;
    ELSIF NEW.confirmed_by IS DISTINCT FROM OLD.confirmed_by
       OR NEW.confirmation_note IS DISTINCT FROM OLD.confirmation_note THEN
        RAISE EXCEPTION 'a confirmation names the database login that made it and cannot be '
                        'rewritten' USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$confirmer$;

CREATE TRIGGER sweep_holds_record_confirmer
BEFORE INSERT OR UPDATE ON sweep_holds
FOR EACH ROW EXECUTE FUNCTION sweep_holds_record_confirmer();

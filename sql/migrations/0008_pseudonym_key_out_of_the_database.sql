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
                        '(see sql/migrations/0008_pseudonym_key_out_of_the_database.sql and '
                        'docs/security.md), set PSEUDONYM_KEY_FILE, then migrate again';
    END IF;
END
$upgrade$;

DROP TABLE service_keys;

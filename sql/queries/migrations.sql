-- The migration runner's bookkeeping (worker/db/migrations.py); the migrations themselves
-- are the files of sql/migrations/.

-- name: create_migrations_table
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: keep_migrations_table_private
-- The migrations' bookkeeping is the migrating role's alone: the default privileges of
-- sql/roles/create_roles.sql would otherwise let the worker role rewrite it.
DO $private$
DECLARE
    grantee_name text;
BEGIN
    FOR grantee_name IN
        SELECT DISTINCT r.rolname
        FROM pg_class AS c
        CROSS JOIN LATERAL aclexplode(c.relacl) AS a
        JOIN pg_roles AS r ON r.oid = a.grantee
        WHERE c.oid = 'schema_migrations'::regclass AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('REVOKE ALL ON schema_migrations FROM %I', grantee_name);
    END LOOP;
END
$private$;

-- name: lock_migrations
-- Held for the whole migrate run, so two processes migrating at once apply each file once.
SELECT pg_advisory_lock(hashtext('license-telemetry:migrate'));

-- name: set_migration_timeouts
-- For the rest of the session (a no-transaction migration runs in several transactions):
-- a statement waiting longer than $1 for a lock, or running longer than $2, is cancelled.
SELECT set_config('lock_timeout', $1, false), set_config('statement_timeout', $2, false);

-- name: reset_migration_timeouts
-- Back to the role's and database's defaults.
RESET lock_timeout;
RESET statement_timeout;

-- name: unlock_migrations
SELECT pg_advisory_unlock(hashtext('license-telemetry:migrate'));

-- name: applied_migrations
SELECT version, name, checksum FROM schema_migrations ORDER BY version;

-- name: record_migration
INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3);

-- name: tell_migrations_the_key_hash
-- The SHA-256 (hex) of the configured pseudonym key, for migration 0009's check ('' when
-- none is configured); session-wide, since each migration runs in a transaction of its own.
SELECT set_config('license.pseudonym_key_sha256', $1, false);

-- name: missing_tables
-- Which of the tables the migrations create do not exist: any role may ask (the catalogue
-- is readable by all), unlike schema_migrations.
SELECT name FROM unnest($1::text[]) AS name WHERE to_regclass(name) IS NULL ORDER BY name;

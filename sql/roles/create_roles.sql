-- The service's two database roles and what each may do (README: "PostgreSQL roles, TLS and
-- secrets from files"). Not a migration: roles belong to the whole cluster, and creating them
-- needs a superuser. `license-worker create-roles` runs these blocks in order, in one
-- transaction, connected as a superuser to the service's database; `choose_roles` hands them
-- the role names and (optionally) SCRAM verifiers of the passwords, never the passwords.
-- Every block is safe to run again: after migrations, or to change a password.
--
--   owner  (license_owner)  owns the tables; `license-worker migrate` runs as it.
--   worker (license_worker) `license-worker run` and every other command: reads and writes
--                           the rows of the service's tables in schema public, nothing else:
--                           no CREATE, ALTER, DROP or TRUNCATE, no other schema, no temporary
--                           tables, and not the migrations' own bookkeeping.

-- name: choose_roles
-- Transaction-local settings: the DO blocks below cannot take parameters.
SELECT set_config('license.owner_role', $1, true),
       set_config('license.worker_role', $2, true),
       set_config('license.owner_password', $3, true),
       set_config('license.worker_password', $4, true);

-- name: create_roles
DO $roles$
DECLARE
    owner_role  text := current_setting('license.owner_role');
    worker_role text := current_setting('license.worker_role');
    role_name   text;
BEGIN
    IF owner_role = worker_role THEN
        RAISE EXCEPTION 'the owner and the worker must be two roles; both are %', owner_role;
    END IF;
    FOREACH role_name IN ARRAY ARRAY[owner_role, worker_role] LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = role_name) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I LOGIN', role_name);
            EXCEPTION WHEN duplicate_object THEN
                NULL;  -- a concurrent run created it first
            END;
        END IF;
        -- Never take powers away from a role someone else relies on: refuse instead.
        IF EXISTS (
            SELECT FROM pg_roles
            WHERE rolname = role_name
              AND (rolsuper OR rolcreaterole OR rolcreatedb OR rolreplication OR rolbypassrls)
        ) THEN
            RAISE EXCEPTION 'role % already exists with powers the service must not have '
                            '(superuser, createrole, createdb, replication or bypassrls); '
                            'choose another role name', role_name;
        END IF;
        EXECUTE format('ALTER ROLE %I LOGIN', role_name);
    END LOOP;
    IF pg_has_role(worker_role, owner_role, 'MEMBER') THEN
        RAISE EXCEPTION 'role % is a member of %: it would have the owner''s powers',
                        worker_role, owner_role;
    END IF;
    IF current_setting('license.owner_password') <> '' THEN
        EXECUTE format('ALTER ROLE %I PASSWORD %L',
                       owner_role, current_setting('license.owner_password'));
    END IF;
    IF current_setting('license.worker_password') <> '' THEN
        EXECUTE format('ALTER ROLE %I PASSWORD %L',
                       worker_role, current_setting('license.worker_password'));
    END IF;
END
$roles$;

-- name: grant_database_access
-- The database is the service's: other roles connect only where a DBA grants it, and nobody
-- but the owner creates temporary tables in it.
DO $database$
DECLARE
    owner_role    text := current_setting('license.owner_role');
    worker_role   text := current_setting('license.worker_role');
    database_name text := current_database();
BEGIN
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', database_name);
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO %I', database_name, owner_role);
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM %I', database_name, worker_role);
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', database_name, worker_role);
END
$database$;

-- name: grant_schema_access
DO $schema$
DECLARE
    owner_role  text := current_setting('license.owner_role');
    worker_role text := current_setting('license.worker_role');
    table_name  text;
BEGIN
    -- Postgres 15 does this itself; older versions let every role create objects in public.
    REVOKE CREATE ON SCHEMA public FROM PUBLIC;
    EXECUTE format('GRANT USAGE, CREATE ON SCHEMA public TO %I', owner_role);
    EXECUTE format('REVOKE ALL ON SCHEMA public FROM %I', worker_role);
    EXECUTE format('GRANT USAGE ON SCHEMA public TO %I', worker_role);

    -- Tables the owner creates from now on (the next migrations) are the worker's to use.
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE %I IN SCHEMA public '
                   'GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO %I',
                   owner_role, worker_role);
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE %I IN SCHEMA public '
                   'GRANT USAGE ON SEQUENCES TO %I', owner_role, worker_role);
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE %I IN SCHEMA public '
                   'GRANT EXECUTE ON FUNCTIONS TO %I', owner_role, worker_role);

    -- Tables that exist already (a run after migrations), except the migrations' bookkeeping;
    -- and nothing beyond rows: a grant made by hand before is taken back.
    FOR table_name IN
        SELECT c.relname FROM pg_class AS c
        WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
    LOOP
        EXECUTE format('REVOKE ALL ON public.%I FROM %I', table_name, worker_role);
        IF table_name <> 'schema_migrations' THEN
            EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON public.%I TO %I',
                           table_name, worker_role);
        END IF;
    END LOOP;
    EXECUTE format('GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO %I', worker_role);
END
$schema$;

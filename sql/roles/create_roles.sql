-- The service's three database roles and what each may do (README: "PostgreSQL roles, TLS
-- and secrets from files"; docs/security.md, "Least privilege"). Not a migration: roles
-- belong to the whole cluster, and creating them needs a superuser. `license-worker
-- create-roles` runs these blocks in order, in one transaction, connected as a superuser to
-- the service's database; `choose_roles` hands them the role names and (optionally) SCRAM
-- verifiers of the passwords, never the passwords. Every block is safe to run again, and
-- must be run again after migrations: a table gets its grants only here.
--
--   owner    (license_owner)    owns the tables; `license-worker migrate` runs as it.
--   worker   (license_worker)   `license-worker run` and every other command: exactly the
--                               statements of sql/queries/*.sql, table by table
--                               (grant_table_access); no DDL, no TRUNCATE, no other schema, no
--                               temporary tables, not the migrations' own bookkeeping.
--   reporter (license_reporter) `license-worker report usage`: SELECT on the tables the
--                               report reads, nothing else.

-- name: choose_roles
-- Transaction-local settings: the DO blocks below cannot take parameters.
SELECT set_config('license.owner_role', $1, true),
       set_config('license.worker_role', $2, true),
       set_config('license.reporter_role', $3, true),
       set_config('license.owner_password', $4, true),
       set_config('license.worker_password', $5, true),
       set_config('license.reporter_password', $6, true);

-- name: create_roles
DO $roles$
DECLARE
    owner_role    text := current_setting('license.owner_role');
    worker_role   text := current_setting('license.worker_role');
    reporter_role text := current_setting('license.reporter_role');
    role_name     text;
BEGIN
    IF owner_role IN (worker_role, reporter_role) OR worker_role = reporter_role THEN
        RAISE EXCEPTION 'the owner, worker and reporter must be three roles: %, %, %',
                        owner_role, worker_role, reporter_role;
    END IF;
    FOREACH role_name IN ARRAY ARRAY[owner_role, worker_role, reporter_role] LOOP
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
    FOREACH role_name IN ARRAY ARRAY[worker_role, reporter_role] LOOP
        IF pg_has_role(role_name, owner_role, 'MEMBER') THEN
            RAISE EXCEPTION 'role % is a member of %: it would have the owner''s powers',
                            role_name, owner_role;
        END IF;
    END LOOP;
    IF pg_has_role(reporter_role, worker_role, 'MEMBER') THEN
        RAISE EXCEPTION 'role % is a member of %: it could write', reporter_role, worker_role;
    END IF;
    IF current_setting('license.owner_password') <> '' THEN
        EXECUTE format('ALTER ROLE %I PASSWORD %L',
                       owner_role, current_setting('license.owner_password'));
    END IF;
    IF current_setting('license.worker_password') <> '' THEN
        EXECUTE format('ALTER ROLE %I PASSWORD %L',
                       worker_role, current_setting('license.worker_password'));
    END IF;
    IF current_setting('license.reporter_password') <> '' THEN
        EXECUTE format('ALTER ROLE %I PASSWORD %L',
                       reporter_role, current_setting('license.reporter_password'));
    END IF;
END
$roles$;

-- name: grant_database_access
-- The database is the service's: other roles connect only where a DBA grants it, and nobody
-- but the owner creates temporary tables in it.
DO $database$
DECLARE
    owner_role    text := current_setting('license.owner_role');
    database_name text := current_database();
    role_name     text;
BEGIN
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', database_name);
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO %I', database_name, owner_role);
    FOREACH role_name IN ARRAY ARRAY[current_setting('license.worker_role'),
                                     current_setting('license.reporter_role')] LOOP
        EXECUTE format('REVOKE ALL ON DATABASE %I FROM %I', database_name, role_name);
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', database_name, role_name);
    END LOOP;
END
$database$;

-- name: grant_schema_access
DO $schema$
DECLARE
    owner_role  text := current_setting('license.owner_role');
    worker_role text := current_setting('license.worker_role');
    role_name   text;
BEGIN
    -- Postgres 15 does this itself; older versions let every role create objects in public.
    REVOKE CREATE ON SCHEMA public FROM PUBLIC;
    EXECUTE format('GRANT USAGE, CREATE ON SCHEMA public TO %I', owner_role);
    FOREACH role_name IN ARRAY ARRAY[worker_role, current_setting('license.reporter_role')] LOOP
        EXECUTE format('REVOKE ALL ON SCHEMA public FROM %I', role_name);
        EXECUTE format('GRANT USAGE ON SCHEMA public TO %I', role_name);
        -- No default privileges on tables: a table is a role's only through the list of
        -- grant_table_access (an earlier version granted every new table to the worker).
        EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE %I IN SCHEMA public '
                       'REVOKE ALL ON TABLES FROM %I', owner_role, role_name);
    END LOOP;
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE %I IN SCHEMA public '
                   'GRANT USAGE ON SEQUENCES TO %I', owner_role, worker_role);
END
$schema$;

-- name: grant_table_access
-- Each role's privileges, table by table, derived from the statements of sql/queries/*.sql
-- (docs/security.md, "Least privilege"). First everything is taken back (a revoked table
-- privilege takes its column privileges along, and a grant made by hand goes too), then
-- exactly these are given. A table not listed (schema_migrations, or a later migration's
-- table not listed yet) is the owner's alone.
-- - SELECT ... FOR UPDATE / FOR SHARE needs UPDATE on the table: customers, users, devices
--   and licenses are locked so.
-- - license_history is append-only except for the purge, which replaces a purged user's id
--   by its pseudonym: UPDATE of subject_id only.
-- - device_history (migration 0012) is append-only except for the purge, which replaces a
--   purged user's id by its pseudonym: UPDATE of user_id only.
-- - license_outbox: the relay marks rows published (published_at); the purge replaces the
--   user's id in subject_id and in the payload of the user's rows, all published by then
--   (purge.sql, users_due_for_purge). No other column, no DELETE.
-- - Withdrawing an allocation billing has not received yet deletes its outbox row, its
--   subject's history from it on and a license row it created: only through the SECURITY
--   DEFINER function withdraw_unsettled_allocations (migration 0011), never by a DELETE grant.
-- - Published outbox rows past the retention (OUTBOX_RETENTION_DAYS) are deleted only through
--   the SECURITY DEFINER function prune_published_license_events (migration 0013), which never
--   deletes an unpublished row, a row published less than a day before, nor more than 10000
--   rows per call.
-- - The partitioned tables (migration 0015: license_history, device_lifecycle_events,
--   usage_snapshots) get partitions and lose those past their retention only through the
--   SECURITY DEFINER function maintain_partitions, which touches nothing else (no DDL, no
--   DELETE grant). license_history_baseline (each subject's latest change before the kept
--   history) is written by it alone; the purge replaces a user's id there too: UPDATE of
--   subject_id only. partition_retention (where the kept rows begin) is read by the report.
-- - sweep_holds: the sweeper holds, extends and applies; confirm-releases confirms (migration
--   0008's trigger records session_user as confirmed_by). Never its customer or held_at.
-- - DELETE only on group_members (the purge deletes a purged user's memberships; a customer's
--   erasure all of them) and legal_holds (`release-hold`).
-- - leases (migration 0014): the sweeper and relay leaders take, renew, give up and check
--   (FOR SHARE) their row; the rows themselves are the migration's.
-- - reporter: the tables of sql/queries/report.sql, SELECT only.
DO $tables$
DECLARE
    worker_role   text := current_setting('license.worker_role');
    reporter_role text := current_setting('license.reporter_role');
    table_name    text;
    allowed       record;
BEGIN
    FOR table_name IN
        SELECT c.relname FROM pg_class AS c
        WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
    LOOP
        EXECUTE format('REVOKE ALL ON public.%I FROM %I, %I',
                       table_name, worker_role, reporter_role);
    END LOOP;
    FOR allowed IN
        SELECT * FROM (VALUES
            ('worker', 'customers', 'SELECT, INSERT, UPDATE'),
            ('worker', 'users', 'SELECT, INSERT, UPDATE'),
            ('worker', 'devices', 'SELECT, INSERT, UPDATE'),
            ('worker', 'device_history', 'SELECT, INSERT, UPDATE (user_id)'),
            ('worker', 'device_lifecycle_events', 'SELECT, INSERT'),
            ('worker', 'ingestion_progress', 'SELECT, INSERT, UPDATE'),
            ('worker', 'licenses', 'SELECT, INSERT, UPDATE'),
            ('worker', 'license_history', 'SELECT, INSERT, UPDATE (subject_id)'),
            ('worker', 'license_history_baseline', 'SELECT, UPDATE (subject_id)'),
            ('worker', 'partition_retention', 'SELECT'),
            ('worker', 'license_outbox',
             'SELECT, INSERT, UPDATE (published_at, subject_id, payload)'),
            ('worker', 'sweep_state', 'SELECT, INSERT, UPDATE'),
            ('worker', 'sweep_holds',
             'SELECT, INSERT, UPDATE (from_boundary, to_boundary, at_risk, active, '
             'confirmed_at, confirmed_by, confirmation_note, applied_at)'),
            ('worker', 'subscriptions', 'SELECT, INSERT, UPDATE'),
            ('worker', 'group_members', 'SELECT, INSERT, UPDATE, DELETE'),
            ('worker', 'usage_snapshots', 'SELECT, INSERT'),
            ('worker', 'legal_holds', 'SELECT, INSERT, DELETE'),
            ('worker', 'erasure_audit', 'SELECT, INSERT'),
            ('worker', 'leases', 'SELECT, UPDATE (holder, token, expires_at)'),
            ('reporter', 'customers', 'SELECT'),
            ('reporter', 'users', 'SELECT'),
            ('reporter', 'devices', 'SELECT'),
            ('reporter', 'device_history', 'SELECT'),
            ('reporter', 'licenses', 'SELECT'),
            ('reporter', 'license_history', 'SELECT'),
            ('reporter', 'license_history_baseline', 'SELECT'),
            ('reporter', 'partition_retention', 'SELECT'),
            ('reporter', 'subscriptions', 'SELECT'),
            ('reporter', 'group_members', 'SELECT')
        ) AS g (grantee, table_name, privileges)
    LOOP
        -- Before the first migration (or the one creating a table) there is nothing to grant
        -- yet: create-roles runs again after migrations.
        IF to_regclass(format('public.%I', allowed.table_name)) IS NOT NULL THEN
            EXECUTE format('GRANT %s ON public.%I TO %I', allowed.privileges, allowed.table_name,
                           CASE allowed.grantee WHEN 'worker' THEN worker_role
                                                ELSE reporter_role END);
        END IF;
    END LOOP;
    EXECUTE format('GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO %I', worker_role);
    -- Withdrawing a pending allocation deletes rows the worker cannot delete itself: only
    -- through this function, which refuses anything billing has received (migration 0011).
    IF to_regprocedure('public.withdraw_unsettled_allocations(uuid[])') IS NOT NULL THEN
        EXECUTE format('GRANT EXECUTE ON FUNCTION public.withdraw_unsettled_allocations(uuid[]) '
                       'TO %I', worker_role);
    END IF;
    -- Pruning published outbox rows past OUTBOX_RETENTION_DAYS likewise: only through this
    -- function, which deletes nothing unpublished and nothing younger than a day (migration
    -- 0013).
    IF to_regprocedure('public.prune_published_license_events(timestamptz, interval, integer)')
       IS NOT NULL THEN
        EXECUTE format('GRANT EXECUTE ON FUNCTION public.prune_published_license_events('
                       'timestamptz, interval, integer) TO %I', worker_role);
    END IF;
    -- Partitions ahead and past the retention likewise (migration 0015): only through this
    -- function, which touches the three partitioned tables alone and keeps at least two
    -- months.
    IF to_regprocedure('public.maintain_partitions(text, timestamptz, interval, integer)')
       IS NOT NULL THEN
        EXECUTE format('GRANT EXECUTE ON FUNCTION public.maintain_partitions('
                       'text, timestamptz, interval, integer) TO %I', worker_role);
    END IF;
END
$tables$;

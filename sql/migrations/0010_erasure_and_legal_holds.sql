-- Erasure on request (GDPR Art. 17) and legal holds (docs/security.md, "Erasure, legal holds
-- and what cannot be erased").

-- A legal hold keeps a user's or a whole customer's data from the purge and from erasure
-- until it is lifted. A user hold names the user while it holds (the user is not purged
-- meanwhile); lifting it deletes the row, and the audit keeps only a keyed hash.
CREATE TABLE legal_holds (
    customer_id  text NOT NULL REFERENCES customers (customer_id),
    scope        text NOT NULL CHECK (scope IN ('user', 'customer')),
    -- The user id, or the customer id for a hold on the whole customer.
    subject_id   text NOT NULL,
    held_at      timestamptz NOT NULL DEFAULT now(),
    held_by      text NOT NULL DEFAULT session_user,
    PRIMARY KEY (customer_id, scope, subject_id)
);

-- Deletion receipts and hold changes. Holds no personal data: the erased identifier only as
-- a keyed HMAC (the pseudonym key), the tables as row counts, the requester as the database
-- session user, and the operator's note (which must not name the person: the command refuses
-- a note that contains the identifier).
CREATE TABLE erasure_audit (
    id            bigserial PRIMARY KEY,
    action        text NOT NULL CHECK (action IN ('erased', 'hold_set', 'hold_lifted')),
    scope         text NOT NULL CHECK (scope IN ('user', 'device', 'customer')),
    customer_id   text NOT NULL,
    subject_hash  text NOT NULL,
    removed       jsonb NOT NULL DEFAULT '{}',
    rows_removed  integer NOT NULL DEFAULT 0,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    requested_by  text NOT NULL DEFAULT session_user,
    note          text NOT NULL
);

-- An erased customer stays as a tombstone (inactive, no name), so that no late agent or
-- console message brings it or its people back.
ALTER TABLE customers ADD COLUMN erased_at timestamptz;

-- Nothing new is stored for an erased customer. Ingestion's statements skip its rows
-- (sql/queries/ingest.sql: a set-based check, cheaper on the hot path than a trigger); the
-- console's writes are dropped row by row here, whatever path they come by (a late console
-- message, a replay): the row is skipped, the statement goes on.
CREATE FUNCTION skip_rows_of_erased_customers() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (
        SELECT FROM customers WHERE customer_id = NEW.customer_id AND erased_at IS NOT NULL
    ) THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER members_of_erased_customers BEFORE INSERT OR UPDATE ON group_members
    FOR EACH ROW EXECUTE FUNCTION skip_rows_of_erased_customers();
CREATE TRIGGER subscriptions_of_erased_customers BEFORE INSERT OR UPDATE ON subscriptions
    FOR EACH ROW EXECUTE FUNCTION skip_rows_of_erased_customers();

-- An erased customer's row does not change again (no reactivation, no new name).
CREATE FUNCTION keep_erased_customers() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.erased_at IS NOT NULL THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER erased_customers_stay BEFORE UPDATE ON customers
    FOR EACH ROW EXECUTE FUNCTION keep_erased_customers();

-- The purge of devices without a user: those with a host name left, by last signal day
-- (day-granular: heartbeats keep their HOT updates, see 0004).
CREATE INDEX devices_without_user_with_hostname ON devices (last_seen_day, customer_id, device_id)
    WHERE user_id IS NULL AND hostname IS NOT NULL;

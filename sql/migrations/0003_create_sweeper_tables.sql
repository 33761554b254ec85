-- State of the license sweeper: how far it has scanned, customers held by the outage guard,
-- and the key that turns purged user ids into pseudonyms.

-- One row: devices silent since before scanned_until have been decided.
CREATE TABLE sweep_state (
    id             boolean PRIMARY KEY DEFAULT true CHECK (id),
    scanned_until  timestamptz NOT NULL,
    last_run_at    timestamptz NOT NULL
);

-- Releases the outage guard held back: the customer's devices silent in
-- [from_boundary, to_boundary) are decided only once an operator confirms.
CREATE TABLE sweep_holds (
    id              bigserial PRIMARY KEY,
    customer_id     text NOT NULL REFERENCES customers (customer_id),
    from_boundary   timestamptz NOT NULL,
    to_boundary     timestamptz NOT NULL,
    at_risk         integer NOT NULL,
    active          integer NOT NULL,
    held_at         timestamptz NOT NULL DEFAULT now(),
    confirmed_at    timestamptz,
    confirmed_by    text,
    applied_at      timestamptz
);

CREATE UNIQUE INDEX sweep_holds_open ON sweep_holds (customer_id) WHERE applied_at IS NULL;

-- A random key per database for pseudonymising purged users (HMAC-SHA256), unless the
-- PSEUDONYM_KEY setting provides one.
CREATE TABLE service_keys (
    name   text PRIMARY KEY,
    value  text NOT NULL
);

INSERT INTO service_keys (name, value)
VALUES ('pseudonym', replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''));

-- A customer's devices by last signal, for applying a confirmed hold.
CREATE INDEX devices_customer_protected_by_last_seen ON devices (customer_id, last_seen_at)
    WHERE protected;

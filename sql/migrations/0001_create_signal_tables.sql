-- Customers, users and devices as the agents report them, keyed per customer: the same
-- device_id or user_id under two customers is two rows that never meet.

CREATE TABLE customers (
    customer_id   text PRIMARY KEY,
    license_model text NOT NULL DEFAULT 'user' CHECK (license_model IN ('user', 'device')),
    first_seen_at timestamptz NOT NULL DEFAULT now()
);

-- Personal data (email, display_name) lives only here; rule 5 purges it.
CREATE TABLE users (
    customer_id         text NOT NULL REFERENCES customers (customer_id),
    user_id             text NOT NULL,
    email               text,
    display_name        text,
    profile_reported_at timestamptz,
    first_seen_at       timestamptz NOT NULL,
    last_seen_at        timestamptz NOT NULL,
    PRIMARY KEY (customer_id, user_id)
);

-- Every *_reported_at column is the event time of the value beside it: a value is replaced
-- only by one reported at the same time or later, so late and duplicated events never undo
-- newer facts, whatever order they arrive in.
CREATE TABLE devices (
    customer_id                text NOT NULL REFERENCES customers (customer_id),
    device_id                  text NOT NULL,
    user_id                    text,
    user_reported_at           timestamptz,
    device_kind                text CHECK (device_kind IN ('business', 'personal')),
    kind_reported_at           timestamptz,
    hostname                   text,
    os                         text,
    details_reported_at        timestamptz,
    agent_version              text,
    agent_version_reported_at  timestamptz,
    first_seen_at              timestamptz NOT NULL,
    last_seen_at               timestamptz NOT NULL,
    last_present_at            timestamptz,
    last_installed_at          timestamptz,
    last_uninstalled_at        timestamptz,
    -- Protected: never uninstalled, or present (heartbeat, install) after the latest
    -- uninstall in event time. Every input is a maximum, so the result does not depend on
    -- the order events arrive in.
    protected                  boolean GENERATED ALWAYS AS (
        last_uninstalled_at IS NULL OR last_present_at > last_uninstalled_at
    ) STORED,
    PRIMARY KEY (customer_id, device_id)
);

CREATE INDEX devices_by_user ON devices (customer_id, user_id) WHERE user_id IS NOT NULL;

-- Install and uninstall events, kept for audit and to recognise redelivered ones. Holds no
-- personal data.
CREATE TABLE device_lifecycle_events (
    customer_id  text NOT NULL,
    event_id     text NOT NULL,
    device_id    text NOT NULL,
    event_type   text NOT NULL CHECK (event_type IN ('install', 'uninstall')),
    occurred_at  timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, event_id),
    FOREIGN KEY (customer_id, device_id) REFERENCES devices (customer_id, device_id)
);

-- How far ingestion has got on each partition, written in the same transaction as the
-- events: the broker time of the newest message stored tells the sweeper whether ingestion
-- has caught up past a release boundary.
CREATE TABLE ingestion_progress (
    topic             text NOT NULL,
    partition         integer NOT NULL,
    next_offset       bigint NOT NULL,
    last_message_at   timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);

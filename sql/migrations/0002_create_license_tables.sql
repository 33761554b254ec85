-- License state: the current license of each user and device, its append-only history, and
-- the transactional outbox of license events for billing.

-- One row per subject that ever held a license. A released row stays (a new allocation is
-- then a reactivation) until the user is purged; after a purge subject_id is a pseudonym.
CREATE TABLE licenses (
    customer_id        text NOT NULL REFERENCES customers (customer_id),
    subject_type       text NOT NULL CHECK (subject_type IN ('user', 'device')),
    subject_id         text NOT NULL,
    active             boolean NOT NULL,
    basis              text NOT NULL
        CHECK (basis IN ('user', 'unassigned', 'over_allowance', 'device_model')),
    allocated_at       timestamptz NOT NULL,
    allocation_reason  text NOT NULL,
    released_at        timestamptz,
    release_reason     text,
    purged_at          timestamptz,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, subject_type, subject_id),
    CHECK (active OR released_at IS NOT NULL)
);

-- The purge scans released users by release time.
CREATE INDEX licenses_released_users ON licenses (released_at)
    WHERE NOT active AND subject_type = 'user' AND purged_at IS NULL;

-- Every change ever made to a license, in order. Never updated, except that a purge
-- replaces the user's id with its pseudonym.
CREATE TABLE license_history (
    id            bigserial PRIMARY KEY,
    customer_id   text NOT NULL,
    subject_type  text NOT NULL,
    subject_id    text NOT NULL,
    change        text NOT NULL
        CHECK (change IN ('allocated', 'released', 'basis_changed', 'purged')),
    basis         text,
    reason        text,
    effective_at  timestamptz NOT NULL,
    decided_at    timestamptz NOT NULL,
    event_id      uuid
);

CREATE INDEX license_history_by_subject ON license_history (customer_id, subject_type, subject_id);

-- Events for billing, written in the same transaction as the change they announce. The relay
-- publishes rows in id order and marks them published; event_id is deterministic, so a row
-- published twice (a crash between send and mark) is recognisable downstream.
CREATE TABLE license_outbox (
    id            bigserial PRIMARY KEY,
    event_id      uuid NOT NULL UNIQUE,
    customer_id   text NOT NULL,
    subject_type  text,
    subject_id    text,
    payload       jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);

CREATE INDEX license_outbox_pending ON license_outbox (id) WHERE published_at IS NULL;
CREATE INDEX license_outbox_by_subject ON license_outbox (customer_id, subject_type, subject_id);

-- The sweeper finds silent devices by last signal time.
CREATE INDEX devices_protected_by_last_seen ON devices (last_seen_at, customer_id, device_id)
    WHERE protected;

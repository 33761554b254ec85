-- Administrative state from the MSP console (topic tenant.admin.v1): customer names and
-- status, subscription packages, user groups; the package every license is attributed to;
-- and the daily usage snapshots sent to billing.

-- An inactive customer's signals are stored but license nothing. The *_changed_at columns
-- hold the console's event time of the last change applied: an older change arriving late
-- is ignored.
ALTER TABLE customers
    ADD COLUMN name               text,
    ADD COLUMN profile_changed_at timestamptz,
    ADD COLUMN status             text NOT NULL DEFAULT 'active'
        CHECK (status IN ('active', 'inactive')),
    ADD COLUMN status_changed_at  timestamptz;

-- A subscription is attached to the customer (group_id NULL: the customer's default
-- package) or to a user group (every member gets its package).
CREATE TABLE subscriptions (
    customer_id        text NOT NULL REFERENCES customers (customer_id),
    subscription_id    text NOT NULL,
    package            text NOT NULL CHECK (package IN ('core', 'core_plus')),
    group_id           text,
    status             text NOT NULL CHECK (status IN ('in_trial', 'active', 'cancelled')),
    trial_ends_at      timestamptz,
    seats              integer CHECK (seats >= 0),
    attached_at        timestamptz NOT NULL,
    -- Event time of the console's last change (or the attachment): orders console changes.
    status_changed_at  timestamptz NOT NULL,
    -- Set when the trial turned active by itself at its end (no console change before it).
    trial_converted_at timestamptz,
    PRIMARY KEY (customer_id, subscription_id),
    CHECK (status <> 'in_trial' OR trial_ends_at IS NOT NULL)
);

CREATE INDEX subscriptions_trials_due ON subscriptions (trial_ends_at) WHERE status = 'in_trial';
CREATE INDEX subscriptions_by_group ON subscriptions (customer_id, group_id)
    WHERE group_id IS NOT NULL;

-- Membership with a tombstone: a late "added" older than a "removed" stays ignored.
CREATE TABLE group_members (
    customer_id  text NOT NULL REFERENCES customers (customer_id),
    group_id     text NOT NULL,
    user_id      text NOT NULL,
    member       boolean NOT NULL,
    changed_at   timestamptz NOT NULL,
    PRIMARY KEY (customer_id, group_id, user_id)
);

CREATE INDEX group_members_by_user ON group_members (customer_id, user_id) WHERE member;

-- The package a license is attributed to (NULL: the customer holds no live subscription).
ALTER TABLE licenses ADD COLUMN package text;
ALTER TABLE license_history ADD COLUMN package text;
ALTER TABLE license_history DROP CONSTRAINT license_history_change_check;
ALTER TABLE license_history ADD CONSTRAINT license_history_change_check
    CHECK (change IN ('allocated', 'released', 'basis_changed', 'package_changed', 'purged'));

-- The as-of usage report replays a customer's history up to a point in time.
CREATE INDEX license_history_by_customer_decided ON license_history (customer_id, decided_at, id);

-- One usage.snapshot event per customer and UTC day.
CREATE TABLE usage_snapshots (
    customer_id  text NOT NULL REFERENCES customers (customer_id),
    day          date NOT NULL,
    event_id     uuid NOT NULL,
    taken_at     timestamptz NOT NULL,
    PRIMARY KEY (customer_id, day)
);

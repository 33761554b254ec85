-- Leader leases (issue #15 part 2; docs/scaling.md "PgBouncer"; worker/db/leases.py): which
-- replica runs the sweeper and which the relay. They replace session advisory locks, which
-- PgBouncer in transaction mode cannot keep: a lease is a row with a holder and an expiry,
-- taken with one UPDATE when expired (or already the taker's), renewed by its holder well
-- before it expires (LEADER_LEASE_SECONDS), checked with FOR SHARE at the start of every
-- transaction of the leader's work (a takeover waits for that transaction; a leader whose
-- lease expired or went to another does nothing more). `token` grows with every new holder.
--
-- One row per role, made here: the worker role only updates them (sql/roles/create_roles.sql).
-- A global table, without customer_id: a Citus reference table (docs/scaling.md).
CREATE TABLE leases (
    name text PRIMARY KEY CHECK (name IN ('sweeper', 'relay')),
    holder text,
    token bigint NOT NULL DEFAULT 0,
    expires_at timestamptz NOT NULL DEFAULT '-infinity'
);

INSERT INTO leases (name) VALUES ('sweeper'), ('relay');

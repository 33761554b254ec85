-- Seats are made visible, not enforced (docs/licensing.md, "Seats"): the sweeper compares
-- each live subscription's licensed users with its `seats` and tells billing when it goes
-- over (`subscription.over_seats`) and back (`subscription.within_seats`). The column holds
-- what billing was last told, so each crossing is sent once.
ALTER TABLE subscriptions ADD COLUMN over_seats boolean NOT NULL DEFAULT false;

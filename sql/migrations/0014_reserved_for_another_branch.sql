-- Placeholder on branch s8-part only: migration 0014 belongs to another branch of issue #15,
-- and the versions must be 1..n without gaps. Delete this file when merging that branch's
-- 0014 (migration 0015 does not depend on it).
SELECT 1;

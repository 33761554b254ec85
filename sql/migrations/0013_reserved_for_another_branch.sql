-- Placeholder on branch scale-citus only: migration 0013 belongs to another branch of issue
-- #15, and the versions must be 1..n without gaps. Delete this file when merging that branch's
-- 0013 (migration 0014 does not depend on it).
SELECT 1;

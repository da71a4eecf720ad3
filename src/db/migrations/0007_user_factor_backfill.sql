-- The factor summary of the users that had authenticators before migration 6. One user at a
-- time through the trigger's own function: each call locks its user and then reads the
-- authenticators afresh, so a change made meanwhile by a replica still on the previous
-- release (which the trigger from migration 6 already mirrors) is never overwritten with
-- older data, as a single UPDATE ... FROM (one snapshot for all) could. Row locks only: user
-- reads carry on throughout.
SELECT roster_refresh_user_factors(project_id, user_id)
FROM (SELECT DISTINCT project_id, user_id FROM authenticators) s;

-- A project's own event retention in days (NULL: the server's --event-retention-days; 0:
-- keep its events): tenants of one deployment answer to different audit and privacy rules.
ALTER TABLE projects ADD COLUMN event_retention_days integer
    CHECK (event_retention_days BETWEEN 0 AND 36500);

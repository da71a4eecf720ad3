-- Retention now deletes per project through events_occurred_at_idx (project_id, occurred_at,
-- id), and no other query reads events across projects: the global occurred_at index only
-- cost every event written (every change's transaction) one more index entry.
DROP INDEX IF EXISTS events_retention_idx;

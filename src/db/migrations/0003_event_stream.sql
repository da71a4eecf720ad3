-- Gap-free event streaming (see src/events/stream.rs for the design).
--
-- Each event records the id of the transaction that wrote it. A BEFORE INSERT trigger takes
-- the transaction id first and the position second, so a transaction always has its id
-- before it holds a position: a reader that has seen every transaction in progress finish
-- knows that no position it read before can still appear.
ALTER TABLE events ADD COLUMN xid xid8;
ALTER TABLE events ALTER COLUMN position DROP DEFAULT;

CREATE FUNCTION roster_event_sequence() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.xid := pg_current_xact_id();
    NEW.position := nextval('events_position_seq');
    RETURN NEW;
END
$$;
CREATE TRIGGER events_sequence BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION roster_event_sequence();

-- ListEvents: ordered by occurred_at with the id as tie-breaker; filters; retention.
DROP INDEX events_occurred_at_idx;
CREATE INDEX events_occurred_at_idx ON events (project_id, occurred_at, id);
CREATE INDEX events_type_idx ON events (project_id, type, occurred_at);
CREATE INDEX events_request_id_idx ON events (project_id, request_id);
CREATE INDEX events_api_key_idx ON events (project_id, api_key_id, occurred_at);
CREATE INDEX events_retention_idx ON events (occurred_at);

-- Streams rely on the sequence handing out values in order across sessions (see
-- src/events/stream.rs): no per-session caching.
ALTER SEQUENCE events_position_seq CACHE 1;

-- A user's confirmed factor types and default factor, kept on the user row by a trigger on
-- authenticators, instead of two authenticator subqueries in every user read: those were a
-- third of PostgreSQL's cost for a GetUser (and 200 index probes for a page of 100 users).
-- Authenticators change rarely; users are read all the time.
-- Adding a column with a constant default rewrites nothing (PostgreSQL 11+), so the table lock
-- this migration takes is brief; the backfill is migration 7, which takes row locks only.
ALTER TABLE users
    ADD COLUMN factor_types smallint[] NOT NULL DEFAULT '{}',
    ADD COLUMN default_factor smallint;

CREATE FUNCTION roster_refresh_user_factors(p uuid, u uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    -- Lock the user first, then read the authenticators in a statement of its own: its fresh
    -- snapshot sees whatever a concurrent change (which held the lock) committed, so the last
    -- refresh of a user always sees every committed authenticator. Roster's own paths hold
    -- this lock already (they lock the user before touching its factors).
    PERFORM 1 FROM users WHERE project_id = p AND id = u FOR UPDATE;
    -- Neither version nor updated_at moves: the factors were never part of the etag.
    UPDATE users SET
        factor_types = ARRAY(SELECT DISTINCT a.type FROM authenticators a
            WHERE a.project_id = p AND a.user_id = u AND a.confirmed ORDER BY a.type),
        default_factor = (SELECT a.type FROM authenticators a
            WHERE a.project_id = p AND a.user_id = u AND a.is_default)
    WHERE project_id = p AND id = u;
END $$;

CREATE FUNCTION roster_authenticators_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        PERFORM roster_refresh_user_factors(OLD.project_id, OLD.user_id);
    END IF;
    IF TG_OP <> 'DELETE' AND (TG_OP = 'INSERT' OR NEW.user_id <> OLD.user_id) THEN
        PERFORM roster_refresh_user_factors(NEW.project_id, NEW.user_id);
    END IF;
    RETURN NULL;
END $$;

-- Only the columns the user row mirrors: a factor's use (last_used_at, counters) fires nothing.
CREATE TRIGGER authenticators_user_factors
    AFTER INSERT OR DELETE OR UPDATE OF user_id, type, confirmed, is_default ON authenticators
    FOR EACH ROW EXECUTE FUNCTION roster_authenticators_changed();

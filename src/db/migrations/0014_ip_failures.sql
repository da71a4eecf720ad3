-- Failed sign-ins owed per project and client address (--ip-failure-limit, or a project's
-- own), kept here rather than in each server's memory so that every replica draws on one
-- budget and a restart of the servers forgives nothing. A row exists while an address owes
-- failures or has a sign-in in progress; one untouched for a whole window has refilled and
-- is purged. UNLOGGED: a sign-in writes no WAL for it and waits for no flush; a crash of
-- PostgreSQL empties the table, which forgives the addresses (a throttle, not a record: the
-- LOGIN_FAILED events keep the failures).
CREATE UNLOGGED TABLE ip_failures (
    project_id uuid NOT NULL,
    -- The address, or for IPv6 its /64 (authenticators::throttle).
    ip         inet NOT NULL,
    -- Failures owed as of `at`; the limit's worth come back, evenly, over the window.
    spent      double precision NOT NULL CHECK (spent >= 0),
    at         timestamptz NOT NULL,
    -- Attempts refused since the address last had room (the first one is logged).
    refusals   integer NOT NULL DEFAULT 0,
    CONSTRAINT ip_failures_pkey PRIMARY KEY (project_id, ip)
);

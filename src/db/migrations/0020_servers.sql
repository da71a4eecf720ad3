-- The servers running against this database: each `roster serve` keeps a row (its host,
-- version, address, and the settings a project's policy falls back to), touched every 30 s
-- and removed when it stops, so operator commands can say which servers run and with what.
CREATE TABLE servers (
    id         uuid PRIMARY KEY,
    host       text NOT NULL,
    version    text NOT NULL,
    listen     text NOT NULL,
    started_at timestamptz NOT NULL,
    seen_at    timestamptz NOT NULL DEFAULT now(),
    settings   jsonb NOT NULL
);

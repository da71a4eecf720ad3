-- Projects, API keys, users, contact verifications and events.
-- Every row belongs to a project; every index leads with project_id so no query can reach
-- across projects by accident and every lookup stays within one project's slice.

CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE TABLE projects (
    id         uuid PRIMARY KEY,
    name       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT projects_name_key UNIQUE (name)
);

CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    project_id  uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name        text NOT NULL,
    scopes      text[] NOT NULL,
    -- SHA-256 of the secret part: the secret is 256 random bits, so a fast hash is enough
    -- and keeps per-request verification cheap.
    secret_hash bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_project_idx ON api_keys (project_id, created_at);

-- Free text searched by ListUsersRequest.query. The unit separator keeps a search term from
-- matching across two fields.
CREATE FUNCTION roster_user_search_text(
    email text, username text, display_name text, given_name text, family_name text,
    external_id text
) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN lower(
    coalesce(email, '') || chr(31) || coalesce(username, '') || chr(31) ||
    coalesce(display_name, '') || chr(31) || coalesce(given_name, '') || chr(31) ||
    coalesce(family_name, '') || chr(31) || coalesce(external_id, '')
);

CREATE TABLE users (
    project_id              uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    id                      uuid NOT NULL,
    -- Empty strings are stored as NULL so that unique indexes ignore them.
    external_id             text,
    email                   text,
    email_verified          boolean NOT NULL DEFAULT false,
    phone_number            text,
    phone_verified          boolean NOT NULL DEFAULT false,
    username                text,
    display_name            text,
    given_name              text,
    family_name             text,
    picture_url             text,
    locale                  text,
    timezone                text,
    -- roster.v1.UserStatus numbers.
    status                  smallint NOT NULL,
    user_metadata           jsonb NOT NULL DEFAULT '{}',
    app_metadata            jsonb NOT NULL DEFAULT '{}',
    password_hash           text,
    password_changed_at     timestamptz,
    require_password_change boolean NOT NULL DEFAULT false,
    login_count             bigint NOT NULL DEFAULT 0,
    last_login_at           timestamptz,
    last_login_ip           text,
    failed_logins           integer NOT NULL DEFAULT 0,
    locked_until            timestamptz,
    blocked_reason          text,
    created_at              timestamptz NOT NULL,
    updated_at              timestamptz NOT NULL,
    -- Bumped by every change; the etag is derived from it.
    version                 bigint NOT NULL DEFAULT 1,
    CONSTRAINT users_pkey PRIMARY KEY (project_id, id)
);
CREATE UNIQUE INDEX users_email_key ON users (project_id, lower(email));
CREATE UNIQUE INDEX users_phone_number_key ON users (project_id, phone_number);
CREATE UNIQUE INDEX users_username_key ON users (project_id, lower(username));
CREATE UNIQUE INDEX users_external_id_key ON users (project_id, external_id);
-- Keyset pagination for each order_by field (id breaks ties).
CREATE INDEX users_created_at_idx ON users (project_id, created_at, id);
CREATE INDEX users_updated_at_idx ON users (project_id, updated_at, id);
CREATE INDEX users_last_login_at_idx ON users (project_id, last_login_at, id);
CREATE INDEX users_display_name_idx ON users (project_id, display_name, id);
CREATE INDEX users_status_idx ON users (project_id, status);
CREATE INDEX users_search_idx ON users USING gin (
    roster_user_search_text(email, username, display_name, given_name, family_name, external_id)
    gin_trgm_ops
);
CREATE INDEX users_app_metadata_idx ON users USING gin (app_metadata jsonb_path_ops);
CREATE INDEX users_user_metadata_idx ON users USING gin (user_metadata jsonb_path_ops);

CREATE TABLE contact_verifications (
    project_id uuid NOT NULL,
    user_id    uuid NOT NULL,
    -- roster.v1.ContactChannel numbers.
    channel    smallint NOT NULL,
    -- The email or phone number the code was issued for: a changed contact voids the code.
    target     text NOT NULL,
    code_salt  bytea NOT NULL,
    code_hash  bytea NOT NULL,
    attempts   integer NOT NULL DEFAULT 0,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (project_id, user_id, channel),
    FOREIGN KEY (project_id, user_id) REFERENCES users (project_id, id) ON DELETE CASCADE
);

-- Events outlive nothing but their project: deleting a user deletes its events explicitly
-- and then records the deletion itself.
CREATE SEQUENCE events_position_seq;
CREATE TABLE events (
    project_id  uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    position    bigint NOT NULL DEFAULT nextval('events_position_seq'),
    id          uuid NOT NULL,
    type        text NOT NULL,
    user_id     uuid,
    occurred_at timestamptz NOT NULL DEFAULT now(),
    api_key_id  uuid,
    ip          text,
    user_agent  text,
    request_id  text,
    data        jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (project_id, position)
);
ALTER SEQUENCE events_position_seq OWNED BY events.position;
CREATE UNIQUE INDEX events_id_key ON events (project_id, id);
CREATE INDEX events_user_idx ON events (project_id, user_id, position);
CREATE INDEX events_occurred_at_idx ON events (project_id, occurred_at, position);

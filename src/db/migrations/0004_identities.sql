-- Linked social/SSO identities. Provider tokens are sealed (AES-256-GCM, see
-- src/crypto/seal.rs) before they reach this table.
CREATE TABLE identities (
    project_id       uuid NOT NULL,
    id               uuid NOT NULL,
    user_id          uuid NOT NULL,
    provider         text NOT NULL,
    subject          text NOT NULL,
    connection       text,
    email            text,
    profile          jsonb NOT NULL DEFAULT '{}',
    access_token     bytea,
    refresh_token    bytea,
    token_expires_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT identities_pkey PRIMARY KEY (project_id, id),
    -- The social-login lookup, and "one user per external identity".
    CONSTRAINT identities_provider_subject_key UNIQUE (project_id, provider, subject),
    FOREIGN KEY (project_id, user_id) REFERENCES users (project_id, id) ON DELETE CASCADE
);
CREATE INDEX identities_user_idx ON identities (project_id, user_id, created_at);

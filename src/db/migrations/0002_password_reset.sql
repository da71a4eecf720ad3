-- One-time password reset tokens. Only a SHA-256 of each token is stored (tokens are 256
-- random bits, so a fast hash suffices); a reset deletes all of the user's tokens.
CREATE TABLE password_reset_tokens (
    project_id  uuid NOT NULL,
    token_hash  bytea NOT NULL,
    user_id     uuid NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    CONSTRAINT password_reset_tokens_pkey PRIMARY KEY (project_id, token_hash),
    FOREIGN KEY (project_id, user_id) REFERENCES users (project_id, id) ON DELETE CASCADE
);
CREATE INDEX password_reset_tokens_user_idx ON password_reset_tokens (project_id, user_id);

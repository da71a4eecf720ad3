-- The hashes of a user's previous passwords, kept only when `--password-history` asks for it
-- (a new password may not repeat one of the last N), newest last; trimmed at each change.
CREATE TABLE password_history (
    project_id  uuid NOT NULL,
    user_id     uuid NOT NULL,
    seq         bigint GENERATED ALWAYS AS IDENTITY,
    hash        text NOT NULL,
    replaced_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT password_history_pkey PRIMARY KEY (project_id, user_id, seq),
    FOREIGN KEY (project_id, user_id) REFERENCES users (project_id, id) ON DELETE CASCADE
);

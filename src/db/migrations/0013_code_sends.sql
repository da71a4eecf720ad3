-- When codes and links were last issued for delivery to a user (StartOtpChallenge,
-- StartContactVerification, CreatePasswordResetToken), per kind, so that a caller (or an
-- attacker behind its "resend" button) cannot flood a user's inbox or phone, nor run up the
-- SMS bill. Only the issues of the last hour are kept: at most --codes-per-hour of them.
CREATE TABLE code_sends (
    project_id uuid NOT NULL,
    user_id    uuid NOT NULL,
    -- authenticators::sends::Delivery numbers.
    kind       smallint NOT NULL,
    sent_at    timestamptz[] NOT NULL,
    CONSTRAINT code_sends_pkey PRIMARY KEY (project_id, user_id, kind),
    FOREIGN KEY (project_id, user_id) REFERENCES users (project_id, id) ON DELETE CASCADE
);

-- A project's own limits over --code-resend-secs and --codes-per-hour (NULL: the server's).
ALTER TABLE projects ADD COLUMN code_resend_secs integer
    CHECK (code_resend_secs BETWEEN 0 AND 3600);
ALTER TABLE projects ADD COLUMN codes_per_hour integer
    CHECK (codes_per_hour BETWEEN 0 AND 1000);
-- A project's own --sms-allowed-prefixes, comma-separated ('' allows any number; NULL: the
-- server's list).
ALTER TABLE projects ADD COLUMN sms_allowed_prefixes text
    CHECK (length(sms_allowed_prefixes) <= 10000);

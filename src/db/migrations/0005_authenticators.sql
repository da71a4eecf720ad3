-- Second factors and passkeys (see src/authenticators/). Passwords stay on users.
--
-- Secrets at rest: TOTP seeds are sealed (AES-256-GCM, src/crypto/seal.rs) before they reach
-- this table; OTP and recovery codes are stored as hashes only. Passkeys hold public keys.
CREATE TABLE authenticators (
    project_id    uuid NOT NULL,
    id            uuid NOT NULL,
    user_id       uuid NOT NULL,
    -- roster.v1.AuthenticatorType numbers.
    type          smallint NOT NULL,
    name          text,
    confirmed     boolean NOT NULL DEFAULT false,
    is_default    boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    -- TOTP: the sealed seed, and the last time step accepted (a step works once).
    totp_secret   bytea,
    totp_last_step bigint,
    -- Email/SMS OTP: the address codes go to, fixed at enrolment.
    email         text,
    phone_number  text,
    -- Passkeys: the credential as webauthn-rs keeps it (public key, counter, flags), plus
    -- the columns the API shows.
    credential_id bytea,
    passkey       jsonb,
    aaguid        uuid,
    transports    text[] NOT NULL DEFAULT '{}',
    backed_up     boolean NOT NULL DEFAULT false,
    sign_count    bigint NOT NULL DEFAULT 0,
    CONSTRAINT authenticators_pkey PRIMARY KEY (project_id, id),
    FOREIGN KEY (project_id, user_id) REFERENCES users (project_id, id) ON DELETE CASCADE
);
CREATE INDEX authenticators_user_idx ON authenticators (project_id, user_id, created_at, id);
-- Exactly one default per user (at most one row; ops keep one whenever any is eligible).
CREATE UNIQUE INDEX authenticators_default_key ON authenticators (project_id, user_id)
    WHERE is_default;
-- A passkey belongs to one user of the project (and finds its user in username-less sign-in).
CREATE UNIQUE INDEX authenticators_credential_id_key ON authenticators (project_id, credential_id);
-- One set of recovery codes, one email channel and one SMS channel per user.
CREATE UNIQUE INDEX authenticators_single_key ON authenticators (project_id, user_id, type)
    WHERE type IN (4, 5, 6);

-- Recovery codes: SHA-256 of each (60 random bits each, single use).
CREATE TABLE recovery_codes (
    project_id       uuid NOT NULL,
    authenticator_id uuid NOT NULL,
    code_hash        bytea NOT NULL,
    used_at          timestamptz,
    CONSTRAINT recovery_codes_pkey PRIMARY KEY (project_id, authenticator_id, code_hash),
    FOREIGN KEY (project_id, authenticator_id) REFERENCES authenticators (project_id, id)
        ON DELETE CASCADE
);

-- The outstanding code of an email/SMS OTP channel: one at a time, salted hash only.
CREATE TABLE otp_challenges (
    project_id       uuid NOT NULL,
    authenticator_id uuid NOT NULL,
    code_salt        bytea NOT NULL,
    code_hash        bytea NOT NULL,
    attempts         integer NOT NULL DEFAULT 0,
    expires_at       timestamptz NOT NULL,
    CONSTRAINT otp_challenges_pkey PRIMARY KEY (project_id, authenticator_id),
    FOREIGN KEY (project_id, authenticator_id) REFERENCES authenticators (project_id, id)
        ON DELETE CASCADE
);

-- WebAuthn ceremonies in progress, so that any replica can finish what another started.
-- A finish consumes its row; expired rows are swept when new ceremonies start.
CREATE TABLE passkey_ceremonies (
    project_id uuid NOT NULL,
    id         uuid NOT NULL,
    -- 1 registration, 2 authentication.
    kind       smallint NOT NULL,
    -- NULL for a username-less (discoverable) authentication.
    user_id    uuid,
    name       text,
    state      jsonb NOT NULL,
    expires_at timestamptz NOT NULL,
    CONSTRAINT passkey_ceremonies_pkey PRIMARY KEY (project_id, id),
    FOREIGN KEY (project_id, user_id) REFERENCES users (project_id, id) ON DELETE CASCADE
);
CREATE INDEX passkey_ceremonies_expiry_idx ON passkey_ceremonies (expires_at);

-- WebAuthn relying party per project: id (a domain), display name and allowed origins.
ALTER TABLE projects ADD COLUMN webauthn_rp_id text;
ALTER TABLE projects ADD COLUMN webauthn_rp_name text;
ALTER TABLE projects ADD COLUMN webauthn_origins text[] NOT NULL DEFAULT '{}';

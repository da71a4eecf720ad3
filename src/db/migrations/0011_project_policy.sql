-- A project's own sign-in policy (`roster projects policy`); NULL: the server's setting.
ALTER TABLE projects ADD COLUMN lockout_threshold integer
    CHECK (lockout_threshold BETWEEN 0 AND 1000000);
ALTER TABLE projects ADD COLUMN lockout_secs integer
    CHECK (lockout_secs BETWEEN 1 AND 31536000);
ALTER TABLE projects ADD COLUMN password_history smallint
    CHECK (password_history BETWEEN 0 AND 24);
ALTER TABLE projects ADD COLUMN password_min_length smallint
    CHECK (password_min_length BETWEEN 8 AND 128);
ALTER TABLE projects ADD COLUMN password_max_age_days integer
    CHECK (password_max_age_days BETWEEN 0 AND 36500);
ALTER TABLE projects ADD COLUMN ip_failure_limit integer
    CHECK (ip_failure_limit BETWEEN 0 AND 1000000);

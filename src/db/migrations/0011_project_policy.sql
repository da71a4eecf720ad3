-- A project's own sign-in policy (`roster projects policy`); NULL: the server's setting.
ALTER TABLE projects ADD COLUMN lockout_threshold integer
    CHECK (lockout_threshold BETWEEN 0 AND 1000000);
ALTER TABLE projects ADD COLUMN lockout_secs integer
    CHECK (lockout_secs BETWEEN 1 AND 31536000);
ALTER TABLE projects ADD COLUMN password_history smallint
    CHECK (password_history BETWEEN 0 AND 24);

-- When a key was last accepted (to within a minute), so an operator can tell whether a key is
-- still in use before revoking it. Nullable without a default: no rewrite, a brief lock.
ALTER TABLE api_keys ADD COLUMN last_used_at timestamptz;

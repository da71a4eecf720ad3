-- An optional end of life for a key (`roster keys create --expires-in 90d`), for policies that
-- require keys to be rotated. Nullable without a default: no rewrite, a brief lock.
ALTER TABLE api_keys ADD COLUMN expires_at timestamptz;

-- A key's own rate limit (`roster keys limit`): calls per second and burst. NULL rate: the
-- server's --rate-limit-rps; 0: not limited. NULL burst: twice the rate.
ALTER TABLE api_keys ADD COLUMN rate_limit_rps double precision
    CHECK (rate_limit_rps BETWEEN 0 AND 1000000);
ALTER TABLE api_keys ADD COLUMN rate_limit_burst double precision
    CHECK (rate_limit_burst BETWEEN 1 AND 1000000);

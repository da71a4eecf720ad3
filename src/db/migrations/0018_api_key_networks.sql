-- The networks an API key is accepted from (NULL: any), checked against the calling peer's
-- address: a key copied out of a cluster is refused wherever it is tried.
ALTER TABLE api_keys ADD COLUMN allowed_networks cidr[];

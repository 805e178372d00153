-- API keys: shown once at creation, stored only as a SHA-256 hash, found by their prefix.
-- A tenant key has a role; a platform key (no tenant) provisions tenants.
CREATE TABLE sluice.api_keys (
    id         text PRIMARY KEY,
    prefix     text NOT NULL UNIQUE,
    hash       text NOT NULL,
    tenant     text REFERENCES sluice.tenants (slug),
    role       text NOT NULL CHECK (role IN ('viewer', 'analyst', 'operator', 'admin', 'platform')),
    name       text,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz,
    CHECK ((tenant IS NULL) = (role = 'platform'))
);
CREATE INDEX api_keys_by_tenant ON sluice.api_keys (tenant);
CREATE INDEX audit_log_by_tenant ON sluice.audit_log (tenant, id);

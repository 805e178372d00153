-- API keys (stored only as a SHA-256 hash, found by prefix) and the audit log of every
-- state-changing call.
CREATE TABLE api_keys (
    id         TEXT PRIMARY KEY,
    prefix     TEXT NOT NULL UNIQUE,
    hash       TEXT NOT NULL,
    tenant     TEXT,
    role       TEXT NOT NULL CHECK (role IN ('viewer', 'analyst', 'operator', 'admin', 'platform')),
    name       TEXT,
    created_at TEXT NOT NULL,
    revoked_at TEXT,
    CHECK ((tenant IS NULL) = (role = 'platform'))
);
CREATE INDEX api_keys_by_tenant ON api_keys (tenant);

CREATE TABLE audit_log (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at     TEXT NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    tenant TEXT,
    target TEXT,
    detail TEXT
);
CREATE INDEX audit_log_by_tenant ON audit_log (tenant, id);

-- Embedded control store (<data dir>/control.sqlite): stored pipeline definitions with
-- encrypted secrets, and each tenant's data key wrapped under SLUICE_MASTER_KEY (created
-- the first time a pipeline of the tenant has secrets).

CREATE TABLE tenant_keys (
    tenant      TEXT PRIMARY KEY,
    wrapped_key BLOB NOT NULL,
    created_at  TEXT NOT NULL
);

CREATE TABLE pipelines (
    tenant     TEXT NOT NULL,
    name       TEXT NOT NULL,
    -- The pipeline's fields (as in its TOML file) as JSON, every secret removed.
    spec       TEXT NOT NULL,
    -- The secret fields as a JSON object, AES-256-GCM sealed under the tenant's data key.
    secrets    BLOB,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (tenant, name)
);

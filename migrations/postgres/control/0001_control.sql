-- Control schema (PostgreSQL): tenants, their wrapped data keys, stored pipeline
-- definitions with encrypted secrets, stream cursors, a cross-tenant run index and the
-- audit log. Applied by `sluice migrate`; the migrator records versions in
-- sluice.schema_migrations.

CREATE TABLE sluice.tenants (
    slug           text PRIMARY KEY CHECK (slug ~ '^[a-z][a-z0-9_]{1,39}$'),
    name           text NOT NULL,
    schema_name    text NOT NULL UNIQUE,
    schema_version integer NOT NULL DEFAULT 0,
    -- The tenant's 256-bit data key, AES-256-GCM encrypted under SLUICE_MASTER_KEY
    -- (12-byte nonce followed by ciphertext and tag).
    wrapped_key    bytea NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sluice.pipelines (
    tenant     text NOT NULL REFERENCES sluice.tenants (slug),
    name       text NOT NULL CHECK (name ~ '^[a-z0-9][a-z0-9_.-]{0,63}$'),
    -- The pipeline's fields (as in its TOML file) with every secret removed.
    spec       jsonb NOT NULL,
    -- The secret fields as a JSON object, AES-256-GCM encrypted under the tenant's data key.
    secrets    bytea,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, name)
);

-- One row per (tenant, pipeline, stream): the cursor reached and the version every batch
-- commit compares-and-sets, so a run that lost ownership cannot commit.
CREATE TABLE sluice.stream_state (
    tenant     text NOT NULL REFERENCES sluice.tenants (slug),
    pipeline   text NOT NULL,
    stream     text NOT NULL,
    cursor     jsonb,
    version    bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, pipeline, stream)
);

-- Which tenant a run belongs to; the run's full ledger lives in the tenant's schema.
CREATE TABLE sluice.runs (
    run_id     text PRIMARY KEY,
    tenant     text NOT NULL REFERENCES sluice.tenants (slug),
    pipeline   text NOT NULL,
    started_at timestamptz NOT NULL
);

CREATE TABLE sluice.audit_log (
    id     bigserial PRIMARY KEY,
    at     timestamptz NOT NULL DEFAULT now(),
    actor  text NOT NULL,
    action text NOT NULL,
    tenant text,
    target text,
    detail jsonb
);

-- Tenant warehouse, PostgreSQL flavour: one schema per tenant. `__SCHEMA__` is replaced by
-- the tenant's quoted schema name (tenant_<slug>) when the migration runs.
-- Every entity table: `source` is the pipeline, `run_id` the last run that read the row
-- (loaded or found unchanged), `loaded_at` when its current version was written, and
-- `row_hash` a fingerprint of its canonical values.

CREATE TABLE __SCHEMA__.customers (
    source text NOT NULL, external_id text NOT NULL,
    name text, email text, currency text, active boolean, updated_at timestamptz,
    deleted_at timestamptz, loaded_at timestamptz NOT NULL, run_id text NOT NULL, row_hash bytea NOT NULL,
    PRIMARY KEY (source, external_id)
);

CREATE TABLE __SCHEMA__.vendors (
    source text NOT NULL, external_id text NOT NULL,
    name text, email text, currency text, active boolean, updated_at timestamptz,
    deleted_at timestamptz, loaded_at timestamptz NOT NULL, run_id text NOT NULL, row_hash bytea NOT NULL,
    PRIMARY KEY (source, external_id)
);

CREATE TABLE __SCHEMA__.accounts (
    source text NOT NULL, external_id text NOT NULL,
    code text, name text, "type" text, updated_at timestamptz,
    deleted_at timestamptz, loaded_at timestamptz NOT NULL, run_id text NOT NULL, row_hash bytea NOT NULL,
    PRIMARY KEY (source, external_id)
);

CREATE TABLE __SCHEMA__.invoices (
    source text NOT NULL, external_id text NOT NULL,
    doc_number text, customer_id text, customer_name text, issue_date date, due_date date,
    currency text, total numeric(18,4), balance numeric(18,4), status text, kind text, updated_at timestamptz,
    deleted_at timestamptz, loaded_at timestamptz NOT NULL, run_id text NOT NULL, row_hash bytea NOT NULL,
    PRIMARY KEY (source, external_id)
);

CREATE TABLE __SCHEMA__.bills (
    source text NOT NULL, external_id text NOT NULL,
    doc_number text, vendor_id text, vendor_name text, issue_date date, due_date date,
    currency text, total numeric(18,4), balance numeric(18,4), status text, kind text, category text,
    updated_at timestamptz,
    deleted_at timestamptz, loaded_at timestamptz NOT NULL, run_id text NOT NULL, row_hash bytea NOT NULL,
    PRIMARY KEY (source, external_id)
);

CREATE TABLE __SCHEMA__.payments (
    source text NOT NULL, external_id text NOT NULL,
    direction text, counterparty_id text, "date" date, amount numeric(18,4), currency text,
    applied_to jsonb, updated_at timestamptz,
    deleted_at timestamptz, loaded_at timestamptz NOT NULL, run_id text NOT NULL, row_hash bytea NOT NULL,
    PRIMARY KEY (source, external_id)
);

CREATE INDEX invoices_open ON __SCHEMA__.invoices (currency, due_date) WHERE balance > 0;
CREATE INDEX bills_open ON __SCHEMA__.bills (currency, due_date) WHERE balance > 0;

CREATE TABLE __SCHEMA__.runs (
    run_id       text PRIMARY KEY,
    pipeline     text NOT NULL,
    entity       text NOT NULL,
    "trigger"    text NOT NULL,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz,
    status       text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
    rows_read    bigint NOT NULL DEFAULT 0,
    inserted     bigint NOT NULL DEFAULT 0,
    updated      bigint NOT NULL DEFAULT 0,
    unchanged    bigint NOT NULL DEFAULT 0,
    quarantined  bigint NOT NULL DEFAULT 0,
    deduplicated bigint NOT NULL DEFAULT 0,
    rules_hash   text NOT NULL,
    error        text
);
CREATE INDEX runs_by_pipeline ON __SCHEMA__.runs (pipeline, started_at);

CREATE TABLE __SCHEMA__.quarantine (
    seq         bigserial UNIQUE,
    id          text PRIMARY KEY,
    run_id      text NOT NULL REFERENCES __SCHEMA__.runs (run_id),
    pipeline    text NOT NULL,
    entity      text NOT NULL,
    status      text NOT NULL CHECK (status IN ('pending', 'fixed', 'replayed', 'ignored')),
    location    text NOT NULL,
    sheet       text,
    source_row  bigint NOT NULL,
    raw         jsonb NOT NULL,
    raw_text    text NOT NULL,
    raw_hash    text NOT NULL,
    errors      jsonb NOT NULL,
    rules       text NOT NULL,
    created_at  timestamptz NOT NULL
);
CREATE INDEX quarantine_by_run ON __SCHEMA__.quarantine (run_id);
CREATE INDEX quarantine_by_status ON __SCHEMA__.quarantine (status);
CREATE UNIQUE INDEX quarantine_open_once ON __SCHEMA__.quarantine (pipeline, raw_hash)
    WHERE status IN ('pending', 'fixed');

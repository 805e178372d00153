-- Tenant warehouse, SQLite flavour (one database file per tenant).
-- Money columns are INTEGER counts of 1/10000 of a currency unit (decimal(18,4)), so sums
-- are exact; dates are TEXT 'YYYY-MM-DD'; instants are TEXT RFC 3339 UTC with
-- microseconds ('2024-01-31T12:00:00.000000Z'), which sorts in time order.
-- Every entity table: `source` is the pipeline, `run_id` the last run that read the row
-- (loaded or found unchanged), `loaded_at` when its current version was written, and
-- `row_hash` a fingerprint of its canonical values.

CREATE TABLE customers (
    source      TEXT NOT NULL,
    external_id TEXT NOT NULL,
    name        TEXT,
    email       TEXT,
    currency    TEXT,
    active      INTEGER,
    updated_at  TEXT,
    deleted_at  TEXT,
    loaded_at   TEXT NOT NULL,
    run_id      TEXT NOT NULL,
    row_hash    BLOB NOT NULL,
    PRIMARY KEY (source, external_id)
) WITHOUT ROWID;

CREATE TABLE vendors (
    source      TEXT NOT NULL,
    external_id TEXT NOT NULL,
    name        TEXT,
    email       TEXT,
    currency    TEXT,
    active      INTEGER,
    updated_at  TEXT,
    deleted_at  TEXT,
    loaded_at   TEXT NOT NULL,
    run_id      TEXT NOT NULL,
    row_hash    BLOB NOT NULL,
    PRIMARY KEY (source, external_id)
) WITHOUT ROWID;

CREATE TABLE accounts (
    source      TEXT NOT NULL,
    external_id TEXT NOT NULL,
    code        TEXT,
    name        TEXT,
    "type"      TEXT,
    updated_at  TEXT,
    deleted_at  TEXT,
    loaded_at   TEXT NOT NULL,
    run_id      TEXT NOT NULL,
    row_hash    BLOB NOT NULL,
    PRIMARY KEY (source, external_id)
) WITHOUT ROWID;

CREATE TABLE invoices (
    source        TEXT NOT NULL,
    external_id   TEXT NOT NULL,
    doc_number    TEXT,
    customer_id   TEXT,
    customer_name TEXT,
    issue_date    TEXT,
    due_date      TEXT,
    currency      TEXT,
    total         INTEGER,
    balance       INTEGER,
    status        TEXT,
    kind          TEXT,
    updated_at    TEXT,
    deleted_at    TEXT,
    loaded_at     TEXT NOT NULL,
    run_id        TEXT NOT NULL,
    row_hash      BLOB NOT NULL,
    PRIMARY KEY (source, external_id)
) WITHOUT ROWID;

CREATE TABLE bills (
    source      TEXT NOT NULL,
    external_id TEXT NOT NULL,
    doc_number  TEXT,
    vendor_id   TEXT,
    vendor_name TEXT,
    issue_date  TEXT,
    due_date    TEXT,
    currency    TEXT,
    total       INTEGER,
    balance     INTEGER,
    status      TEXT,
    kind        TEXT,
    category    TEXT,
    updated_at  TEXT,
    deleted_at  TEXT,
    loaded_at   TEXT NOT NULL,
    run_id      TEXT NOT NULL,
    row_hash    BLOB NOT NULL,
    PRIMARY KEY (source, external_id)
) WITHOUT ROWID;

CREATE TABLE payments (
    source          TEXT NOT NULL,
    external_id     TEXT NOT NULL,
    direction       TEXT,
    counterparty_id TEXT,
    "date"          TEXT,
    amount          INTEGER,
    currency        TEXT,
    applied_to      TEXT,
    updated_at      TEXT,
    deleted_at      TEXT,
    loaded_at       TEXT NOT NULL,
    run_id          TEXT NOT NULL,
    row_hash        BLOB NOT NULL,
    PRIMARY KEY (source, external_id)
) WITHOUT ROWID;

CREATE INDEX invoices_open ON invoices (currency, due_date) WHERE balance > 0;
CREATE INDEX bills_open ON bills (currency, due_date) WHERE balance > 0;

CREATE TABLE runs (
    run_id       TEXT PRIMARY KEY,
    pipeline     TEXT NOT NULL,
    entity       TEXT NOT NULL,
    "trigger"    TEXT NOT NULL,
    started_at   TEXT NOT NULL,
    finished_at  TEXT,
    status       TEXT NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
    rows_read    INTEGER NOT NULL DEFAULT 0,
    inserted     INTEGER NOT NULL DEFAULT 0,
    updated      INTEGER NOT NULL DEFAULT 0,
    unchanged    INTEGER NOT NULL DEFAULT 0,
    quarantined  INTEGER NOT NULL DEFAULT 0,
    deduplicated INTEGER NOT NULL DEFAULT 0,
    rules_hash   TEXT NOT NULL,
    error        TEXT
);
CREATE INDEX runs_by_pipeline ON runs (pipeline, started_at);

CREATE TABLE quarantine (
    id          TEXT PRIMARY KEY,
    run_id      TEXT NOT NULL REFERENCES runs (run_id),
    pipeline    TEXT NOT NULL,
    entity      TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('pending', 'fixed', 'replayed', 'ignored')),
    location    TEXT NOT NULL,
    sheet       TEXT,
    source_row  INTEGER NOT NULL,
    raw         TEXT NOT NULL,
    raw_hash    TEXT NOT NULL,
    errors      TEXT NOT NULL,
    rules       TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE INDEX quarantine_by_run ON quarantine (run_id);
-- The same bad record read again by a later run updates its open quarantine entry instead
-- of piling up copies; once replayed or ignored, a new occurrence is a new entry.
CREATE UNIQUE INDEX quarantine_open_once ON quarantine (pipeline, raw_hash)
    WHERE status IN ('pending', 'fixed');
CREATE INDEX quarantine_by_status ON quarantine (status);

-- One row per (pipeline, stream): the cursor reached and a version that every batch
-- commit compares-and-sets, so a run that lost ownership cannot commit.
CREATE TABLE stream_state (
    pipeline    TEXT NOT NULL,
    stream      TEXT NOT NULL,
    cursor      TEXT,
    version     INTEGER NOT NULL DEFAULT 0,
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (pipeline, stream)
);

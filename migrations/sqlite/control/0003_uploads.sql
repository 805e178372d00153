-- Files uploaded to a pipeline, by content hash: the same file is loaded once.
CREATE TABLE uploads (
    tenant     TEXT NOT NULL,
    pipeline   TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    run_id     TEXT NOT NULL,
    size       INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (tenant, pipeline, sha256)
);

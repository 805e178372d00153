-- Files uploaded to a pipeline, by content hash: the same file is loaded once.
CREATE TABLE sluice.uploads (
    tenant     text NOT NULL REFERENCES sluice.tenants (slug),
    pipeline   text NOT NULL,
    sha256     text NOT NULL,
    run_id     text NOT NULL,
    size       bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, pipeline, sha256)
);

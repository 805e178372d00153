-- Who defined a pipeline: `api` (a tenant's admin, confined to the server's file roots
-- and egress policy) or `shell` (the user running sluice on their own files). Rows that
-- existed before this column are treated as `api`: confinement is the safe default.
ALTER TABLE sluice.pipelines ADD COLUMN origin TEXT NOT NULL DEFAULT 'api'
    CHECK (origin IN ('api', 'shell'));

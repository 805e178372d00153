-- A run's quarantine counts per rule are aggregated in the database (GET /v1/runs/{id}).
CREATE INDEX IF NOT EXISTS quarantine_by_run ON quarantine (run_id);

-- Jobs that exhausted their retries or failed permanently, with every attempt's error and
-- time, until an admin replays them. `__SCHEMA__` is the tenant's quoted schema.
CREATE TABLE __SCHEMA__.dead_letters (
    seq         bigserial UNIQUE,
    id          text PRIMARY KEY,
    pipeline    text NOT NULL,
    job_kind    text NOT NULL,
    job         jsonb NOT NULL,
    attempts    jsonb NOT NULL,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL,
    replayed_at timestamptz,
    replay_run  text
);
CREATE INDEX dead_letters_by_pipeline ON __SCHEMA__.dead_letters (pipeline, created_at);

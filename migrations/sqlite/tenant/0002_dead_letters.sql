-- Jobs that exhausted their retries or failed permanently, with every attempt's error and
-- time, until an admin replays them.
CREATE TABLE dead_letters (
    id          TEXT PRIMARY KEY,
    pipeline    TEXT NOT NULL,
    job_kind    TEXT NOT NULL,
    job         TEXT NOT NULL,
    attempts    TEXT NOT NULL,
    reason      TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    replayed_at TEXT,
    replay_run  TEXT
);
CREATE INDEX dead_letters_by_pipeline ON dead_letters (pipeline, created_at);

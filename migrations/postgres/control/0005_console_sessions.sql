-- Console sessions: the browser holds the random id in a cookie; only its SHA-256 is kept.
-- The key is looked up on every request, so a revoked key's sessions end with it.
CREATE TABLE sluice.console_sessions (
    id_hash      text PRIMARY KEY,
    key_prefix   text NOT NULL,
    created_at   timestamptz NOT NULL,
    last_seen_at timestamptz NOT NULL
);
CREATE INDEX console_sessions_by_last_seen ON sluice.console_sessions (last_seen_at);

-- Console sessions: the browser holds the random id in a cookie; only its SHA-256 is kept.
-- The key is looked up on every request, so a revoked key's sessions end with it.
CREATE TABLE console_sessions (
    id_hash      TEXT PRIMARY KEY,
    key_prefix   TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    last_seen_at TEXT NOT NULL
);
CREATE INDEX console_sessions_by_last_seen ON console_sessions (last_seen_at);

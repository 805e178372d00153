-- Webhook endpoints of each tenant (secret sealed under the tenant's data key), the
-- deliveries of events to them (one per event and endpoint, its id the webhook-id) and
-- every attempt with the answer it got.
CREATE TABLE webhook_endpoints (
    tenant               TEXT NOT NULL,
    id                   TEXT NOT NULL,
    url                  TEXT NOT NULL,
    events               TEXT NOT NULL,
    quarantine_threshold INTEGER NOT NULL DEFAULT 0,
    description          TEXT NOT NULL DEFAULT '',
    -- The whsec_ key bytes, AES-256-GCM sealed under the tenant's data key.
    secret               BLOB NOT NULL,
    created_at           TEXT NOT NULL,
    secret_rotated_at    TEXT NOT NULL,
    PRIMARY KEY (tenant, id)
);

CREATE TABLE webhook_deliveries (
    tenant       TEXT NOT NULL,
    id           TEXT NOT NULL,
    endpoint_id  TEXT NOT NULL,
    event_type   TEXT NOT NULL,
    event_key    TEXT NOT NULL,
    payload      TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL,
    delivered_at TEXT,
    PRIMARY KEY (tenant, id)
);
CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (tenant, endpoint_id, created_at DESC, id DESC);
CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (status, updated_at);

CREATE TABLE webhook_attempts (
    tenant      TEXT NOT NULL,
    delivery_id TEXT NOT NULL,
    number      INTEGER NOT NULL,
    at          TEXT NOT NULL,
    status_code INTEGER,
    response    TEXT NOT NULL,
    duration_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, delivery_id, number)
);

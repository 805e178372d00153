-- Webhook endpoints of each tenant (secret sealed under the tenant's data key), the
-- deliveries of events to them (one per event and endpoint, its id the webhook-id) and
-- every attempt with the answer it got.
CREATE TABLE sluice.webhook_endpoints (
    tenant               text NOT NULL REFERENCES sluice.tenants (slug),
    id                   text NOT NULL CHECK (id ~ '^ep_[0-9a-f]{24}$'),
    url                  text NOT NULL,
    events               jsonb NOT NULL,
    quarantine_threshold bigint NOT NULL DEFAULT 0 CHECK (quarantine_threshold >= 0),
    description          text NOT NULL DEFAULT '',
    -- The whsec_ key bytes, AES-256-GCM sealed under the tenant's data key.
    secret               bytea NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    secret_rotated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, id)
);

CREATE TABLE sluice.webhook_deliveries (
    tenant       text NOT NULL REFERENCES sluice.tenants (slug),
    id           text NOT NULL,
    endpoint_id  text NOT NULL,
    event_type   text NOT NULL,
    event_key    text NOT NULL,
    payload      text NOT NULL,
    status       text NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts     bigint NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz,
    PRIMARY KEY (tenant, id)
);
CREATE INDEX webhook_deliveries_by_endpoint ON sluice.webhook_deliveries (tenant, endpoint_id, created_at DESC, id DESC);
CREATE INDEX webhook_deliveries_pending ON sluice.webhook_deliveries (updated_at) WHERE status = 'pending';

CREATE TABLE sluice.webhook_attempts (
    tenant      text NOT NULL,
    delivery_id text NOT NULL,
    number      bigint NOT NULL,
    at          timestamptz NOT NULL,
    status_code bigint,
    response    text NOT NULL,
    duration_ms bigint NOT NULL,
    PRIMARY KEY (tenant, delivery_id, number),
    FOREIGN KEY (tenant, delivery_id) REFERENCES sluice.webhook_deliveries (tenant, id)
);

//! Webhook endpoints (secrets sealed under the tenant's data key), their deliveries and
//! every attempt, in the control schema.

use super::{PostgresWarehouse, control_error, db};
use crate::control::webhooks::WebhookSecret;
use crate::control::{
    DeliveryAttempt, DeliveryStatus, NewWebhookEndpoint, WebhookDelivery, WebhookEndpoint,
    WebhookEvent, WebhookStore, new_endpoint_id, webhook_secret_context,
};
use crate::error::Result;
use crate::tenant::TenantSlug;
use crate::warehouse::rows::{
    attempt_from_row, delivery_from_row, endpoint_from_row, signing_from_row,
};
use chrono::{DateTime, Utc};

impl WebhookStore for PostgresWarehouse {
    async fn create_webhook(
        &self,
        tenant: &TenantSlug,
        new: &NewWebhookEndpoint,
    ) -> Result<(WebhookEndpoint, WebhookSecret)> {
        new.validate()?;
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("starting to store the webhook"))?;
        let key = self.data_key_held(&mut tx, tenant).await?;
        let id = new_endpoint_id();
        let secret = WebhookSecret::generate();
        let sealed = key.seal(secret.key(), &webhook_secret_context(tenant, &id));
        let row = sqlx::query(
            "INSERT INTO sluice.webhook_endpoints (tenant, id, url, events, quarantine_threshold, description, secret) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *",
        )
        .bind(tenant.as_str())
        .bind(&id)
        .bind(&new.url)
        .bind(sqlx::types::Json(&new.events))
        .bind(i64::try_from(new.quarantine_threshold).unwrap_or(i64::MAX))
        .bind(&new.description)
        .bind(sealed)
        .fetch_one(&mut *tx)
        .await
        .map_err(db("storing the webhook"))?;
        let endpoint = endpoint_from_row(&row)?;
        tx.commit().await.map_err(db("committing the webhook"))?;
        Ok((endpoint, secret))
    }

    async fn webhooks(&self, tenant: &TenantSlug) -> Result<Vec<WebhookEndpoint>> {
        let rows = sqlx::query(
            "SELECT * FROM sluice.webhook_endpoints WHERE tenant = $1 ORDER BY created_at, id",
        )
        .bind(tenant.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(|e| control_error("listing webhooks", e))?;
        rows.iter().map(endpoint_from_row).collect()
    }

    async fn webhook_signing(
        &self,
        tenant: &TenantSlug,
        id: &str,
    ) -> Result<Option<(WebhookEndpoint, WebhookSecret)>> {
        // The secret and the key that sealed it in one statement, from the same side of
        // any rotation.
        let row = sqlx::query(
            "SELECT e.*, t.wrapped_key FROM sluice.webhook_endpoints e \
             LEFT JOIN sluice.tenants t ON t.slug = e.tenant WHERE e.tenant = $1 AND e.id = $2",
        )
        .bind(tenant.as_str())
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| control_error("reading the webhook", e))?;
        row.map(|r| signing_from_row(&r, self.master.as_deref(), tenant))
            .transpose()
    }

    async fn rotate_webhook_secret(
        &self,
        tenant: &TenantSlug,
        id: &str,
    ) -> Result<Option<WebhookSecret>> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("starting the secret rotation"))?;
        let key = self.data_key_held(&mut tx, tenant).await?;
        let secret = WebhookSecret::generate();
        let n = sqlx::query(
            "UPDATE sluice.webhook_endpoints SET secret = $3, secret_rotated_at = now() WHERE tenant = $1 AND id = $2",
        )
        .bind(tenant.as_str())
        .bind(id)
        .bind(key.seal(secret.key(), &webhook_secret_context(tenant, id)))
        .execute(&mut *tx)
        .await
        .map_err(db("storing the rotated secret"))?
        .rows_affected();
        tx.commit().await.map_err(db("committing the rotation"))?;
        Ok((n == 1).then_some(secret))
    }

    async fn delete_webhook(&self, tenant: &TenantSlug, id: &str) -> Result<bool> {
        let n = sqlx::query("DELETE FROM sluice.webhook_endpoints WHERE tenant = $1 AND id = $2")
            .bind(tenant.as_str())
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(|e| control_error("deleting the webhook", e))?
            .rows_affected();
        Ok(n == 1)
    }

    async fn record_webhook_event(
        &self,
        tenant: &TenantSlug,
        event: &WebhookEvent,
    ) -> Result<Vec<String>> {
        let endpoints: Vec<String> = self
            .webhooks(tenant)
            .await?
            .into_iter()
            .filter(|e| e.wants(event))
            .map(|e| e.id)
            .collect();
        if endpoints.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = endpoints.iter().map(|e| event.delivery_id(e)).collect();
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("starting to record the event"))?;
        let body = event.body(Utc::now()).to_string();
        for (endpoint, id) in endpoints.iter().zip(&ids) {
            sqlx::query(
                "INSERT INTO sluice.webhook_deliveries (tenant, id, endpoint_id, event_type, event_key, payload, status) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'pending') ON CONFLICT (tenant, id) DO NOTHING",
            )
            .bind(tenant.as_str())
            .bind(id)
            .bind(endpoint)
            .bind(event.event_type.as_str())
            .bind(&event.key)
            .bind(&body)
            .execute(&mut *tx)
            .await
            .map_err(db("recording a delivery"))?;
        }
        let pending: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM sluice.webhook_deliveries WHERE tenant = $1 AND id = ANY($2) AND status = 'pending' ORDER BY id",
        )
        .bind(tenant.as_str())
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("reading the event's deliveries"))?;
        tx.commit().await.map_err(db("committing the event"))?;
        Ok(pending)
    }

    async fn webhook_delivery(
        &self,
        tenant: &TenantSlug,
        id: &str,
    ) -> Result<Option<WebhookDelivery>> {
        sqlx::query("SELECT * FROM sluice.webhook_deliveries WHERE tenant = $1 AND id = $2")
            .bind(tenant.as_str())
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| control_error("reading the delivery", e))?
            .as_ref()
            .map(delivery_from_row)
            .transpose()
    }

    async fn webhook_deliveries(
        &self,
        tenant: &TenantSlug,
        endpoint: &str,
        before: Option<&str>,
        limit: u32,
    ) -> Result<Vec<WebhookDelivery>> {
        let rows = sqlx::query(
            "SELECT d.* FROM sluice.webhook_deliveries d WHERE d.tenant = $1 AND d.endpoint_id = $2 \
             AND ($3::text IS NULL OR (d.created_at, d.id) < \
                  (SELECT b.created_at, b.id FROM sluice.webhook_deliveries b WHERE b.tenant = $1 AND b.id = $3)) \
             ORDER BY d.created_at DESC, d.id DESC LIMIT $4",
        )
        .bind(tenant.as_str())
        .bind(endpoint)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| control_error("listing deliveries", e))?;
        rows.iter().map(delivery_from_row).collect()
    }

    async fn delivery_attempts(
        &self,
        tenant: &TenantSlug,
        delivery: &str,
    ) -> Result<Vec<DeliveryAttempt>> {
        let rows = sqlx::query(
            "SELECT * FROM sluice.webhook_attempts WHERE tenant = $1 AND delivery_id = $2 ORDER BY number",
        )
        .bind(tenant.as_str())
        .bind(delivery)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| control_error("listing attempts", e))?;
        rows.iter().map(attempt_from_row).collect()
    }

    async fn record_delivery_attempt(
        &self,
        tenant: &TenantSlug,
        attempt: &DeliveryAttempt,
        status: DeliveryStatus,
    ) -> Result<u32> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("starting to record the attempt"))?;
        let delivered = (status == DeliveryStatus::Delivered).then_some(attempt.at);
        let number: i64 = sqlx::query_scalar(
            "UPDATE sluice.webhook_deliveries SET attempts = attempts + 1, status = $3, updated_at = now(), \
             delivered_at = COALESCE($4, delivered_at) WHERE tenant = $1 AND id = $2 RETURNING attempts",
        )
        .bind(tenant.as_str())
        .bind(&attempt.delivery_id)
        .bind(status.as_str())
        .bind(delivered)
        .fetch_one(&mut *tx)
        .await
        .map_err(db("recording the delivery's status"))?;
        sqlx::query(
            "INSERT INTO sluice.webhook_attempts (tenant, delivery_id, number, at, status_code, response, duration_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(tenant.as_str())
        .bind(&attempt.delivery_id)
        .bind(number)
        .bind(attempt.at)
        .bind(attempt.status_code.map(i64::from))
        .bind(&attempt.response)
        .bind(i64::try_from(attempt.duration_ms).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await
        .map_err(db("recording the attempt"))?;
        tx.commit().await.map_err(db("committing the attempt"))?;
        Ok(u32::try_from(number).unwrap_or(u32::MAX))
    }

    async fn reopen_delivery(&self, tenant: &TenantSlug, id: &str) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE sluice.webhook_deliveries SET status = 'pending', updated_at = now() WHERE tenant = $1 AND id = $2",
        )
        .bind(tenant.as_str())
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(|e| control_error("reopening the delivery", e))?
        .rows_affected();
        Ok(n == 1)
    }

    async fn stale_deliveries(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<(String, String)>> {
        sqlx::query_as(
            "UPDATE sluice.webhook_deliveries SET updated_at = now() WHERE (tenant, id) IN \
             (SELECT tenant, id FROM sluice.webhook_deliveries WHERE status = 'pending' AND updated_at < $1 \
              ORDER BY updated_at LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING tenant, id",
        )
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| control_error("finding deliveries whose job was lost", e))
    }
}

//! Webhook endpoints (secrets sealed under the tenant's data key), their deliveries and
//! every attempt, in the control database.

use super::{SqliteWarehouse, now_text};
use crate::control::webhooks::WebhookSecret;
use crate::control::{
    DeliveryAttempt, DeliveryStatus, NewWebhookEndpoint, WebhookDelivery, WebhookEndpoint,
    WebhookEvent, WebhookStore, new_endpoint_id, webhook_secret_context,
};
use crate::error::{EngineError, ErrorKind, Result};
use crate::tenant::TenantSlug;
use crate::warehouse::rows::{
    attempt_from_row, delivery_from_row, endpoint_from_row, signing_from_row,
};
use chrono::{DateTime, Utc};

fn text(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

fn sqlx_error(context: &'static str) -> impl FnOnce(sqlx::Error) -> EngineError {
    move |e| EngineError::from_sqlx(context, e)
}

impl WebhookStore for SqliteWarehouse {
    async fn create_webhook(
        &self,
        tenant: &TenantSlug,
        new: &NewWebhookEndpoint,
    ) -> Result<(WebhookEndpoint, WebhookSecret)> {
        new.validate()?;
        let mut tx = self.control_write().await?;
        let key = self.data_key_in(&mut tx, tenant).await?;
        let id = new_endpoint_id();
        let secret = WebhookSecret::generate();
        let now = now_text();
        let events = serde_json::to_string(&new.events).map_err(|e| {
            EngineError::new(ErrorKind::Input, "encoding the events").with_source(e)
        })?;
        let row = sqlx::query(
            "INSERT INTO webhook_endpoints (tenant, id, url, events, quarantine_threshold, description, secret, created_at, secret_rotated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
        )
        .bind(tenant.as_str())
        .bind(&id)
        .bind(&new.url)
        .bind(events)
        .bind(i64::try_from(new.quarantine_threshold).unwrap_or(i64::MAX))
        .bind(&new.description)
        .bind(key.seal(secret.key(), &webhook_secret_context(tenant, &id)))
        .bind(&now)
        .bind(&now)
        .fetch_one(&mut *tx)
        .await
        .map_err(sqlx_error("storing the webhook"))?;
        let endpoint = endpoint_from_row(&row)?;
        tx.commit()
            .await
            .map_err(sqlx_error("committing the webhook"))?;
        Ok((endpoint, secret))
    }

    async fn webhooks(&self, tenant: &TenantSlug) -> Result<Vec<WebhookEndpoint>> {
        let rows =
            sqlx::query("SELECT * FROM webhook_endpoints WHERE tenant = ? ORDER BY created_at, id")
                .bind(tenant.as_str())
                .fetch_all(self.control().await?)
                .await
                .map_err(sqlx_error("listing webhooks"))?;
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
            "SELECT e.*, k.wrapped_key FROM webhook_endpoints e \
             LEFT JOIN tenant_keys k ON k.tenant = e.tenant WHERE e.tenant = ? AND e.id = ?",
        )
        .bind(tenant.as_str())
        .bind(id)
        .fetch_optional(self.control().await?)
        .await
        .map_err(sqlx_error("reading the webhook"))?;
        row.map(|r| signing_from_row(&r, self.master.as_deref(), tenant))
            .transpose()
    }

    async fn rotate_webhook_secret(
        &self,
        tenant: &TenantSlug,
        id: &str,
    ) -> Result<Option<WebhookSecret>> {
        let mut tx = self.control_write().await?;
        let key = self.data_key_in(&mut tx, tenant).await?;
        let secret = WebhookSecret::generate();
        let n = sqlx::query(
            "UPDATE webhook_endpoints SET secret = ?, secret_rotated_at = ? WHERE tenant = ? AND id = ?",
        )
        .bind(key.seal(secret.key(), &webhook_secret_context(tenant, id)))
        .bind(now_text())
        .bind(tenant.as_str())
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(sqlx_error("storing the rotated secret"))?
        .rows_affected();
        tx.commit()
            .await
            .map_err(sqlx_error("committing the rotation"))?;
        Ok((n == 1).then_some(secret))
    }

    async fn delete_webhook(&self, tenant: &TenantSlug, id: &str) -> Result<bool> {
        let n = sqlx::query("DELETE FROM webhook_endpoints WHERE tenant = ? AND id = ?")
            .bind(tenant.as_str())
            .bind(id)
            .execute(self.control().await?)
            .await
            .map_err(sqlx_error("deleting the webhook"))?
            .rows_affected();
        Ok(n == 1)
    }

    async fn record_webhook_event(
        &self,
        tenant: &TenantSlug,
        event: &WebhookEvent,
    ) -> Result<Vec<String>> {
        let endpoints = self.webhooks(tenant).await?;
        let wanted: Vec<&WebhookEndpoint> = endpoints.iter().filter(|e| e.wants(event)).collect();
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.control_write().await?;
        let now = now_text();
        let body = event.body(Utc::now()).to_string();
        let mut pending = Vec::new();
        for endpoint in wanted {
            let id = event.delivery_id(&endpoint.id);
            sqlx::query(
                "INSERT INTO webhook_deliveries (tenant, id, endpoint_id, event_type, event_key, payload, status, created_at, updated_at) \
                 VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?) ON CONFLICT (tenant, id) DO NOTHING",
            )
            .bind(tenant.as_str())
            .bind(&id)
            .bind(&endpoint.id)
            .bind(event.event_type.as_str())
            .bind(&event.key)
            .bind(&body)
            .bind(&now)
            .bind(&now)
            .execute(&mut *tx)
            .await
            .map_err(sqlx_error("recording a delivery"))?;
            let status: String = sqlx::query_scalar(
                "SELECT status FROM webhook_deliveries WHERE tenant = ? AND id = ?",
            )
            .bind(tenant.as_str())
            .bind(&id)
            .fetch_one(&mut *tx)
            .await
            .map_err(sqlx_error("reading the event's deliveries"))?;
            if status == "pending" {
                pending.push(id);
            }
        }
        tx.commit()
            .await
            .map_err(sqlx_error("committing the event"))?;
        pending.sort();
        Ok(pending)
    }

    async fn webhook_delivery(
        &self,
        tenant: &TenantSlug,
        id: &str,
    ) -> Result<Option<WebhookDelivery>> {
        sqlx::query("SELECT * FROM webhook_deliveries WHERE tenant = ? AND id = ?")
            .bind(tenant.as_str())
            .bind(id)
            .fetch_optional(self.control().await?)
            .await
            .map_err(sqlx_error("reading the delivery"))?
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
            "SELECT d.* FROM webhook_deliveries d WHERE d.tenant = ?1 AND d.endpoint_id = ?2 \
             AND (?3 IS NULL OR (d.created_at, d.id) < \
                  (SELECT b.created_at, b.id FROM webhook_deliveries b WHERE b.tenant = ?1 AND b.id = ?3)) \
             ORDER BY d.created_at DESC, d.id DESC LIMIT ?4",
        )
        .bind(tenant.as_str())
        .bind(endpoint)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(self.control().await?)
        .await
        .map_err(sqlx_error("listing deliveries"))?;
        rows.iter().map(delivery_from_row).collect()
    }

    async fn delivery_attempts(
        &self,
        tenant: &TenantSlug,
        delivery: &str,
    ) -> Result<Vec<DeliveryAttempt>> {
        let rows = sqlx::query(
            "SELECT * FROM webhook_attempts WHERE tenant = ? AND delivery_id = ? ORDER BY number",
        )
        .bind(tenant.as_str())
        .bind(delivery)
        .fetch_all(self.control().await?)
        .await
        .map_err(sqlx_error("listing attempts"))?;
        rows.iter().map(attempt_from_row).collect()
    }

    async fn record_delivery_attempt(
        &self,
        tenant: &TenantSlug,
        attempt: &DeliveryAttempt,
        status: DeliveryStatus,
    ) -> Result<u32> {
        let mut tx = self.control_write().await?;
        let delivered = (status == DeliveryStatus::Delivered).then(|| text(attempt.at));
        let number: i64 = sqlx::query_scalar(
            "UPDATE webhook_deliveries SET attempts = attempts + 1, status = ?, updated_at = ?, \
             delivered_at = COALESCE(?, delivered_at) WHERE tenant = ? AND id = ? RETURNING attempts",
        )
        .bind(status.as_str())
        .bind(now_text())
        .bind(delivered)
        .bind(tenant.as_str())
        .bind(&attempt.delivery_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(sqlx_error("recording the delivery's status"))?;
        sqlx::query(
            "INSERT INTO webhook_attempts (tenant, delivery_id, number, at, status_code, response, duration_ms) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(tenant.as_str())
        .bind(&attempt.delivery_id)
        .bind(number)
        .bind(text(attempt.at))
        .bind(attempt.status_code.map(i64::from))
        .bind(&attempt.response)
        .bind(i64::try_from(attempt.duration_ms).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await
        .map_err(sqlx_error("recording the attempt"))?;
        tx.commit()
            .await
            .map_err(sqlx_error("committing the attempt"))?;
        Ok(u32::try_from(number).unwrap_or(u32::MAX))
    }

    async fn reopen_delivery(&self, tenant: &TenantSlug, id: &str) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE webhook_deliveries SET status = 'pending', updated_at = ? WHERE tenant = ? AND id = ?",
        )
        .bind(now_text())
        .bind(tenant.as_str())
        .bind(id)
        .execute(self.control().await?)
        .await
        .map_err(sqlx_error("reopening the delivery"))?
        .rows_affected();
        Ok(n == 1)
    }

    async fn stale_deliveries(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<(String, String)>> {
        let mut tx = self.control_write().await?;
        let stale: Vec<(String, String)> = sqlx::query_as(
            "SELECT tenant, id FROM webhook_deliveries WHERE status = 'pending' AND updated_at < ? \
             ORDER BY updated_at LIMIT ?",
        )
        .bind(text(before))
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(sqlx_error("finding deliveries whose job was lost"))?;
        let now = now_text();
        for (tenant, id) in &stale {
            sqlx::query("UPDATE webhook_deliveries SET updated_at = ? WHERE tenant = ? AND id = ?")
                .bind(&now)
                .bind(tenant)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(sqlx_error("touching a lost delivery"))?;
        }
        tx.commit()
            .await
            .map_err(sqlx_error("committing the sweep"))?;
        Ok(stale)
    }
}

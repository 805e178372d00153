//! API keys (stored hashed), tenant provisioning through the API, and the audit log.

use super::rows::get;
use super::{SqliteWarehouse, now_text};
use crate::control::{AccessStore, ApiKeyRecord, AuditEntry, ConsoleSession};
use crate::error::{EngineError, Result};
use crate::tenant::TenantSlug;
use crate::warehouse::LoadStore;
use crate::warehouse::rows::{key_from_row, parse_instant};
use chrono::{DateTime, Utc};
use serde_json::Value;

impl AccessStore for SqliteWarehouse {
    async fn provision_tenant(&self, tenant: &TenantSlug, _name: &str) -> Result<bool> {
        if self.tenant_path(tenant).exists() {
            return Ok(false);
        }
        self.prepare_tenant(tenant).await?;
        Ok(true)
    }

    async fn create_key(&self, key: &ApiKeyRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO api_keys (id, prefix, hash, tenant, role, name, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&key.id)
        .bind(&key.prefix)
        .bind(&key.hash)
        .bind(&key.tenant)
        .bind(key.role.as_str())
        .bind(&key.name)
        .bind(key.created_at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        .execute(self.control().await?)
        .await
        .map_err(|e| EngineError::from_sqlx("storing the API key", e))?;
        Ok(())
    }

    async fn key_by_prefix(&self, prefix: &str) -> Result<Option<ApiKeyRecord>> {
        let row = sqlx::query("SELECT * FROM api_keys WHERE prefix = ?")
            .bind(prefix)
            .fetch_optional(self.control().await?)
            .await
            .map_err(|e| EngineError::from_sqlx("reading the API key", e))?;
        row.map(|r| key_from_row(&r)).transpose()
    }

    async fn keys(&self, tenant: Option<&TenantSlug>) -> Result<Vec<ApiKeyRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM api_keys WHERE tenant IS ? ORDER BY created_at DESC, id DESC",
        )
        .bind(tenant.map(TenantSlug::as_str))
        .fetch_all(self.control().await?)
        .await
        .map_err(|e| EngineError::from_sqlx("listing API keys", e))?;
        rows.iter().map(key_from_row).collect()
    }

    async fn revoke_key(&self, tenant: Option<&TenantSlug>, id: &str) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND tenant IS ? AND revoked_at IS NULL",
        )
        .bind(now_text())
        .bind(id)
        .bind(tenant.map(TenantSlug::as_str))
        .execute(self.control().await?)
        .await
        .map_err(|e| EngineError::from_sqlx("revoking the API key", e))?
        .rows_affected();
        Ok(n == 1)
    }

    async fn start_session(
        &self,
        session: &ConsoleSession,
        idle_before: DateTime<Utc>,
    ) -> Result<()> {
        let pool = self.control().await?;
        sqlx::query("DELETE FROM console_sessions WHERE last_seen_at < ?")
            .bind(instant_text(idle_before))
            .execute(pool)
            .await
            .map_err(|e| EngineError::from_sqlx("deleting idle console sessions", e))?;
        sqlx::query(
            "INSERT INTO console_sessions (id_hash, key_prefix, created_at, last_seen_at) VALUES (?, ?, ?, ?)",
        )
        .bind(&session.id_hash)
        .bind(&session.key_prefix)
        .bind(instant_text(session.created_at))
        .bind(instant_text(session.last_seen_at))
        .execute(pool)
        .await
        .map_err(|e| EngineError::from_sqlx("storing the console session", e))?;
        Ok(())
    }

    async fn session(&self, id_hash: &str) -> Result<Option<ConsoleSession>> {
        let row = sqlx::query("SELECT * FROM console_sessions WHERE id_hash = ?")
            .bind(id_hash)
            .fetch_optional(self.control().await?)
            .await
            .map_err(|e| EngineError::from_sqlx("reading the console session", e))?;
        row.map(|r| {
            let created: String = get(&r, "created_at")?;
            let seen: String = get(&r, "last_seen_at")?;
            Ok(ConsoleSession {
                id_hash: get(&r, "id_hash")?,
                key_prefix: get(&r, "key_prefix")?,
                created_at: parse_instant(&created)?,
                last_seen_at: parse_instant(&seen)?,
            })
        })
        .transpose()
    }

    async fn touch_session(&self, id_hash: &str, at: DateTime<Utc>) -> Result<()> {
        sqlx::query("UPDATE console_sessions SET last_seen_at = ? WHERE id_hash = ?")
            .bind(instant_text(at))
            .bind(id_hash)
            .execute(self.control().await?)
            .await
            .map_err(|e| EngineError::from_sqlx("touching the console session", e))?;
        Ok(())
    }

    async fn end_session(&self, id_hash: &str) -> Result<()> {
        sqlx::query("DELETE FROM console_sessions WHERE id_hash = ?")
            .bind(id_hash)
            .execute(self.control().await?)
            .await
            .map_err(|e| EngineError::from_sqlx("ending the console session", e))?;
        Ok(())
    }

    async fn record_audit(
        &self,
        actor: &str,
        action: &str,
        tenant: Option<&TenantSlug>,
        target: &str,
        detail: &Value,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO audit_log (at, actor, action, tenant, target, detail) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(now_text())
        .bind(actor)
        .bind(action)
        .bind(tenant.map(TenantSlug::as_str))
        .bind(target)
        .bind(detail.to_string())
        .execute(self.control().await?)
        .await
        .map_err(|e| EngineError::from_sqlx("writing the audit log", e))?;
        Ok(())
    }

    async fn audit_log(
        &self,
        tenant: &TenantSlug,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT * FROM audit_log WHERE tenant = ? AND (? IS NULL OR id < ?) ORDER BY id DESC LIMIT ?",
        )
        .bind(tenant.as_str())
        .bind(before)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(self.control().await?)
        .await
        .map_err(|e| EngineError::from_sqlx("reading the audit log", e))?;
        rows.iter()
            .map(|r| {
                let at: String = get(r, "at")?;
                let detail: Option<String> = get(r, "detail")?;
                Ok(AuditEntry {
                    id: get(r, "id")?,
                    at: parse_instant(&at)?,
                    actor: get(r, "actor")?,
                    action: get(r, "action")?,
                    tenant: get(r, "tenant")?,
                    target: get::<Option<String>>(r, "target")?.unwrap_or_default(),
                    detail: detail
                        .and_then(|d| serde_json::from_str(&d).ok())
                        .unwrap_or(Value::Null),
                })
            })
            .collect()
    }
}

/// An instant as the control database stores it (sortable text, microseconds, UTC).
fn instant_text(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

//! API keys (stored hashed), tenant provisioning through the API, and the audit log.

use super::rows::get;
use super::{SqliteWarehouse, now_text};
use crate::control::{AccessStore, ApiKeyRecord, AuditEntry};
use crate::error::{EngineError, Result};
use crate::tenant::TenantSlug;
use crate::warehouse::LoadStore;
use crate::warehouse::rows::{key_from_row, parse_instant};
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

//! API keys (stored hashed), tenant provisioning through the API, and the audit log.

use super::rows::get;
use super::{PostgresWarehouse, control_error, db};
use crate::control::{AccessStore, ApiKeyRecord, AuditEntry, ConsoleSession, no_master_key};
use crate::error::Result;
use crate::tenant::TenantSlug;
use crate::warehouse::rows::key_from_row;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::Row;
use sqlx::{Postgres, Transaction};

pub(super) async fn audit(
    tx: &mut Transaction<'static, Postgres>,
    actor: &str,
    action: &str,
    tenant: Option<&str>,
    target: &str,
    detail: Value,
) -> Result<()> {
    sqlx::query("INSERT INTO sluice.audit_log (actor, action, tenant, target, detail) VALUES ($1, $2, $3, $4, $5)")
        .bind(actor)
        .bind(action)
        .bind(tenant)
        .bind(target)
        .bind(sqlx::types::Json(detail))
        .execute(&mut **tx)
        .await
        .map_err(db("writing the audit log"))?;
    Ok(())
}

impl AccessStore for PostgresWarehouse {
    async fn provision_tenant(&self, tenant: &TenantSlug, name: &str) -> Result<bool> {
        if self.tenant_info(tenant).await?.is_some() {
            return Ok(false);
        }
        let master = self.master.as_deref().ok_or_else(no_master_key)?;
        self.create_tenant(tenant, name, master).await?;
        Ok(true)
    }

    async fn create_key(&self, key: &ApiKeyRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO sluice.api_keys (id, prefix, hash, tenant, role, name, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&key.id)
        .bind(&key.prefix)
        .bind(&key.hash)
        .bind(&key.tenant)
        .bind(key.role.as_str())
        .bind(&key.name)
        .bind(key.created_at)
        .execute(&self.pool)
        .await
        .map_err(|e| control_error("storing the API key", e))?;
        Ok(())
    }

    async fn key_by_prefix(&self, prefix: &str) -> Result<Option<ApiKeyRecord>> {
        let row = sqlx::query("SELECT * FROM sluice.api_keys WHERE prefix = $1")
            .bind(prefix)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| control_error("reading the API key", e))?;
        row.map(|r| key_from_row(&r)).transpose()
    }

    async fn keys(&self, tenant: Option<&TenantSlug>) -> Result<Vec<ApiKeyRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM sluice.api_keys WHERE tenant IS NOT DISTINCT FROM $1 ORDER BY created_at DESC, id DESC",
        )
        .bind(tenant.map(TenantSlug::as_str))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| control_error("listing API keys", e))?;
        rows.iter().map(key_from_row).collect()
    }

    async fn revoke_key(&self, tenant: Option<&TenantSlug>, id: &str) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE sluice.api_keys SET revoked_at = now() WHERE id = $1 AND tenant IS NOT DISTINCT FROM $2 AND revoked_at IS NULL",
        )
        .bind(id)
        .bind(tenant.map(TenantSlug::as_str))
        .execute(&self.pool)
        .await
        .map_err(|e| control_error("revoking the API key", e))?
        .rows_affected();
        Ok(n == 1)
    }

    async fn start_session(
        &self,
        session: &ConsoleSession,
        idle_before: DateTime<Utc>,
    ) -> Result<()> {
        sqlx::query("DELETE FROM sluice.console_sessions WHERE last_seen_at < $1")
            .bind(idle_before)
            .execute(&self.pool)
            .await
            .map_err(|e| control_error("deleting idle console sessions", e))?;
        sqlx::query(
            "INSERT INTO sluice.console_sessions (id_hash, key_prefix, created_at, last_seen_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&session.id_hash)
        .bind(&session.key_prefix)
        .bind(session.created_at)
        .bind(session.last_seen_at)
        .execute(&self.pool)
        .await
        .map_err(|e| control_error("storing the console session", e))?;
        Ok(())
    }

    async fn session(&self, id_hash: &str) -> Result<Option<ConsoleSession>> {
        let row = sqlx::query("SELECT * FROM sluice.console_sessions WHERE id_hash = $1")
            .bind(id_hash)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| control_error("reading the console session", e))?;
        row.map(|r| {
            let read = |e| control_error("reading the console session", e);
            Ok(ConsoleSession {
                id_hash: r.try_get("id_hash").map_err(read)?,
                key_prefix: r.try_get("key_prefix").map_err(read)?,
                created_at: r.try_get("created_at").map_err(read)?,
                last_seen_at: r.try_get("last_seen_at").map_err(read)?,
            })
        })
        .transpose()
    }

    async fn touch_session(&self, id_hash: &str, at: DateTime<Utc>) -> Result<()> {
        sqlx::query("UPDATE sluice.console_sessions SET last_seen_at = $1 WHERE id_hash = $2")
            .bind(at)
            .bind(id_hash)
            .execute(&self.pool)
            .await
            .map_err(|e| control_error("touching the console session", e))?;
        Ok(())
    }

    async fn end_session(&self, id_hash: &str) -> Result<()> {
        sqlx::query("DELETE FROM sluice.console_sessions WHERE id_hash = $1")
            .bind(id_hash)
            .execute(&self.pool)
            .await
            .map_err(|e| control_error("ending the console session", e))?;
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
        sqlx::query("INSERT INTO sluice.audit_log (actor, action, tenant, target, detail) VALUES ($1, $2, $3, $4, $5)")
            .bind(actor)
            .bind(action)
            .bind(tenant.map(TenantSlug::as_str))
            .bind(target)
            .bind(sqlx::types::Json(detail))
            .execute(&self.pool)
            .await
            .map_err(|e| control_error("writing the audit log", e))?;
        Ok(())
    }

    async fn audit_log(
        &self,
        tenant: &TenantSlug,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT id, at, actor, action, tenant, target, detail FROM sluice.audit_log \
             WHERE tenant = $1 AND ($2::bigint IS NULL OR id < $2) ORDER BY id DESC LIMIT $3",
        )
        .bind(tenant.as_str())
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| control_error("reading the audit log", e))?;
        rows.iter()
            .map(|r| {
                let detail: Option<sqlx::types::Json<Value>> = get(r, "detail")?;
                Ok(AuditEntry {
                    id: get(r, "id")?,
                    at: get(r, "at")?,
                    actor: get(r, "actor")?,
                    action: get(r, "action")?,
                    tenant: get(r, "tenant")?,
                    target: get::<Option<String>>(r, "target")?.unwrap_or_default(),
                    detail: detail.map_or(Value::Null, |d| d.0),
                })
            })
            .collect()
    }
}

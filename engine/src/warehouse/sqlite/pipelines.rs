//! Pipeline definitions in the control database, secrets sealed under the tenant's data
//! key; uploaded files and the run that loaded each.

use super::{SqliteWarehouse, now_text};
use crate::control::{
    PipelineChange, PipelineOrigin, PipelineStore, ScheduledPipeline, StoredPipeline,
    decode_secrets, no_master_key, secrets_context,
};
use crate::error::{EngineError, ErrorKind, Result};
use crate::tenant::TenantSlug;
use crate::warehouse::rows::parse_instant;
use serde_json::Value;

impl PipelineStore for SqliteWarehouse {
    async fn save_pipeline(
        &self,
        tenant: &TenantSlug,
        name: &str,
        spec: &Value,
        secrets: &serde_json::Map<String, Value>,
        change: &PipelineChange,
    ) -> Result<()> {
        // Sealed under the key read in this write transaction: a key rotation cannot come
        // between the read and the row.
        let mut tx = self.control_write().await?;
        let sealed = if secrets.is_empty() {
            None
        } else {
            let key = self.data_key_in(&mut tx, tenant).await?;
            Some(key.seal(
                Value::Object(secrets.clone()).to_string().as_bytes(),
                &secrets_context(tenant, name),
            ))
        };
        let now = now_text();
        sqlx::query(
            "INSERT INTO pipelines (tenant, name, spec, secrets, created_at, updated_at, origin) VALUES (?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (tenant, name) DO UPDATE SET spec = excluded.spec, secrets = excluded.secrets, updated_at = excluded.updated_at, origin = excluded.origin",
        )
        .bind(tenant.as_str())
        .bind(name)
        .bind(spec.to_string())
        .bind(sealed)
        .bind(&now)
        .bind(&now)
        .bind(change.origin.as_str())
        .execute(&mut *tx)
        .await
        .map_err(|e| EngineError::from_sqlx("storing the pipeline", e))?;
        sqlx::query(
            "INSERT INTO audit_log (at, actor, action, tenant, target, detail) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&now)
        .bind(&change.actor)
        .bind(change.action)
        .bind(tenant.as_str())
        .bind(name)
        .bind(change.detail.to_string())
        .execute(&mut *tx)
        .await
        .map_err(|e| EngineError::from_sqlx("writing the audit log", e))?;
        tx.commit()
            .await
            .map_err(|e| EngineError::from_sqlx("committing the pipeline", e))
    }

    async fn pipeline(&self, tenant: &TenantSlug, name: &str) -> Result<Option<StoredPipeline>> {
        // The secrets and the key that sealed them in one statement: a rotation commits
        // both together, so they are read from the same side of it.
        type Row = (String, Option<Vec<u8>>, String, String, Option<Vec<u8>>);
        let row: Option<Row> = sqlx::query_as(
            "SELECT p.spec, p.secrets, p.updated_at, p.origin, k.wrapped_key FROM pipelines p \
             LEFT JOIN tenant_keys k ON k.tenant = p.tenant WHERE p.tenant = ? AND p.name = ?",
        )
        .bind(tenant.as_str())
        .bind(name)
        .fetch_optional(self.control().await?)
        .await
        .map_err(|e| EngineError::from_sqlx("reading the pipeline", e))?;
        let Some((spec, sealed, updated_at, origin, wrapped)) = row else {
            return Ok(None);
        };
        let secrets = match sealed {
            None => serde_json::Map::new(),
            Some(bytes) => {
                let master = self.master.as_deref().ok_or_else(no_master_key)?;
                let wrapped = wrapped.ok_or_else(|| {
                    EngineError::new(
                        ErrorKind::Warehouse,
                        format!("the key of tenant '{tenant}' is missing from the control store"),
                    )
                })?;
                let key = master.unwrap_key(&wrapped, tenant.as_str())?;
                decode_secrets(&key.open(&bytes, &secrets_context(tenant, name))?)?
            }
        };
        let spec = serde_json::from_str(&spec).map_err(|e| {
            EngineError::new(ErrorKind::Warehouse, "a stored pipeline is not JSON").with_source(e)
        })?;
        Ok(Some(StoredPipeline {
            tenant: tenant.to_string(),
            name: name.to_string(),
            spec,
            secrets,
            updated_at: parse_instant(&updated_at)?,
            origin: PipelineOrigin::parse(&origin),
        }))
    }

    async fn pipelines(&self, tenant: &TenantSlug) -> Result<Vec<StoredPipeline>> {
        let names: Vec<String> =
            sqlx::query_scalar("SELECT name FROM pipelines WHERE tenant = ? ORDER BY name")
                .bind(tenant.as_str())
                .fetch_all(self.control().await?)
                .await
                .map_err(|e| EngineError::from_sqlx("listing pipelines", e))?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            if let Some(p) = self.pipeline(tenant, &name).await? {
                out.push(p);
            }
        }
        Ok(out)
    }

    async fn upload_run(
        &self,
        tenant: &TenantSlug,
        pipeline: &str,
        sha256: &str,
    ) -> Result<Option<String>> {
        sqlx::query_scalar(
            "SELECT run_id FROM uploads WHERE tenant = ? AND pipeline = ? AND sha256 = ?",
        )
        .bind(tenant.as_str())
        .bind(pipeline)
        .bind(sha256)
        .fetch_optional(self.control().await?)
        .await
        .map_err(|e| EngineError::from_sqlx("reading uploads", e))
    }

    async fn record_upload(
        &self,
        tenant: &TenantSlug,
        pipeline: &str,
        sha256: &str,
        size: u64,
        run_id: &str,
    ) -> Result<String> {
        sqlx::query(
            "INSERT INTO uploads (tenant, pipeline, sha256, run_id, size, created_at) VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (tenant, pipeline, sha256) DO NOTHING",
        )
        .bind(tenant.as_str())
        .bind(pipeline)
        .bind(sha256)
        .bind(run_id)
        .bind(size as i64)
        .bind(now_text())
        .execute(self.control().await?)
        .await
        .map_err(|e| EngineError::from_sqlx("recording the upload", e))?;
        Ok(self
            .upload_run(tenant, pipeline, sha256)
            .await?
            .unwrap_or_else(|| run_id.to_string()))
    }

    async fn delete_pipeline(&self, tenant: &TenantSlug, name: &str) -> Result<bool> {
        let n = sqlx::query("DELETE FROM pipelines WHERE tenant = ? AND name = ?")
            .bind(tenant.as_str())
            .bind(name)
            .execute(self.control().await?)
            .await
            .map_err(|e| EngineError::from_sqlx("deleting the pipeline", e))?
            .rows_affected();
        Ok(n == 1)
    }

    async fn scheduled_pipelines(&self) -> Result<Vec<ScheduledPipeline>> {
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT tenant, name, json_extract(spec, '$.schedule.cron') AS cron FROM pipelines \
             WHERE cron IS NOT NULL ORDER BY tenant, name",
        )
        .fetch_all(self.control().await?)
        .await
        .map_err(|e| EngineError::from_sqlx("listing scheduled pipelines", e))?;
        Ok(rows
            .into_iter()
            .map(|(tenant, name, cron)| ScheduledPipeline { tenant, name, cron })
            .collect())
    }
}

//! Pipeline definitions in the control schema, secrets sealed under the tenant's data key;
//! uploaded files and the run that loaded each.

use super::access::audit;
use super::{PostgresWarehouse, control_error, db, missing_tenant};
use crate::control::{
    PipelineChange, PipelineOrigin, PipelineStore, ScheduledPipeline, StoredPipeline,
    decode_secrets, no_master_key, secrets_context,
};
use crate::error::Result;
use crate::tenant::TenantSlug;
use serde_json::Value;
use sqlx::Row;

impl PipelineStore for PostgresWarehouse {
    async fn save_pipeline(
        &self,
        tenant: &TenantSlug,
        name: &str,
        spec: &Value,
        secrets: &serde_json::Map<String, Value>,
        change: &PipelineChange,
    ) -> Result<()> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("starting to store the pipeline"))?;
        // Sealed under the key read in this transaction, held against a rotation until
        // the row is written.
        let sealed = if secrets.is_empty() {
            None
        } else {
            let key = self.data_key_held(&mut tx, tenant).await?;
            Some(key.seal(
                Value::Object(secrets.clone()).to_string().as_bytes(),
                &secrets_context(tenant, name),
            ))
        };
        sqlx::query(
            "INSERT INTO sluice.pipelines (tenant, name, spec, secrets, origin) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (tenant, name) DO UPDATE SET spec = EXCLUDED.spec, secrets = EXCLUDED.secrets, origin = EXCLUDED.origin, updated_at = now()",
        )
        .bind(tenant.as_str())
        .bind(name)
        .bind(sqlx::types::Json(spec))
        .bind(sealed)
        .bind(change.origin.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db("storing the pipeline"))?;
        audit(
            &mut tx,
            &change.actor,
            change.action,
            Some(tenant.as_str()),
            name,
            change.detail.clone(),
        )
        .await?;
        tx.commit().await.map_err(db("committing the pipeline"))
    }

    async fn pipeline(&self, tenant: &TenantSlug, name: &str) -> Result<Option<StoredPipeline>> {
        // The secrets and the key that sealed them, in one statement: a rotation commits
        // both together, so they are read from the same side of it.
        let row = sqlx::query(
            "SELECT p.spec, p.secrets, p.updated_at, p.origin, t.wrapped_key FROM sluice.pipelines p \
             LEFT JOIN sluice.tenants t ON t.slug = p.tenant WHERE p.tenant = $1 AND p.name = $2",
        )
        .bind(tenant.as_str())
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| control_error("reading the pipeline", e))?;
        let Some(row) = row else { return Ok(None) };
        let spec: sqlx::types::Json<Value> = row.try_get("spec").map_err(db("spec"))?;
        let sealed: Option<Vec<u8>> = row.try_get("secrets").map_err(db("secrets"))?;
        let wrapped: Option<Vec<u8>> = row.try_get("wrapped_key").map_err(db("wrapped_key"))?;
        let secrets = match sealed {
            None => serde_json::Map::new(),
            Some(bytes) => {
                let master = self.master.as_deref().ok_or_else(no_master_key)?;
                let wrapped = wrapped.ok_or_else(|| missing_tenant(tenant))?;
                let key = master.unwrap_key(&wrapped, tenant.as_str())?;
                decode_secrets(&key.open(&bytes, &secrets_context(tenant, name))?)?
            }
        };
        Ok(Some(StoredPipeline {
            tenant: tenant.to_string(),
            name: name.to_string(),
            spec: spec.0,
            secrets,
            updated_at: row.try_get("updated_at").map_err(db("updated_at"))?,
            origin: PipelineOrigin::parse(row.try_get("origin").map_err(db("origin"))?),
        }))
    }

    async fn pipelines(&self, tenant: &TenantSlug) -> Result<Vec<StoredPipeline>> {
        let names: Vec<String> =
            sqlx::query_scalar("SELECT name FROM sluice.pipelines WHERE tenant = $1 ORDER BY name")
                .bind(tenant.as_str())
                .fetch_all(&self.pool)
                .await
                .map_err(|e| control_error("listing pipelines", e))?;
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
            "SELECT run_id FROM sluice.uploads WHERE tenant = $1 AND pipeline = $2 AND sha256 = $3",
        )
        .bind(tenant.as_str())
        .bind(pipeline)
        .bind(sha256)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| control_error("reading uploads", e))
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
            "INSERT INTO sluice.uploads (tenant, pipeline, sha256, run_id, size) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (tenant, pipeline, sha256) DO NOTHING",
        )
        .bind(tenant.as_str())
        .bind(pipeline)
        .bind(sha256)
        .bind(run_id)
        .bind(size as i64)
        .execute(&self.pool)
        .await
        .map_err(|e| control_error("recording the upload", e))?;
        Ok(self
            .upload_run(tenant, pipeline, sha256)
            .await?
            .unwrap_or_else(|| run_id.to_string()))
    }

    async fn delete_pipeline(&self, tenant: &TenantSlug, name: &str) -> Result<bool> {
        let n = sqlx::query("DELETE FROM sluice.pipelines WHERE tenant = $1 AND name = $2")
            .bind(tenant.as_str())
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(|e| control_error("deleting the pipeline", e))?
            .rows_affected();
        Ok(n == 1)
    }

    async fn scheduled_pipelines(&self) -> Result<Vec<ScheduledPipeline>> {
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT tenant, name, spec->'schedule'->>'cron' FROM sluice.pipelines \
             WHERE spec->'schedule'->>'cron' IS NOT NULL ORDER BY tenant, name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| control_error("listing scheduled pipelines", e))?;
        Ok(rows
            .into_iter()
            .map(|(tenant, name, cron)| ScheduledPipeline { tenant, name, cron })
            .collect())
    }
}

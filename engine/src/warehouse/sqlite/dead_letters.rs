//! Dead letters of the tenant: recorded, listed, marked replayed once.

use super::{SqliteWarehouse, now_text};
use crate::control::DeadLetter;
use crate::error::{EngineError, Result};
use crate::tenant::TenantSlug;
use crate::warehouse::DeadLetterStore;
use crate::warehouse::rows::dead_letter_from_row;

impl DeadLetterStore for SqliteWarehouse {
    async fn record_dead_letter(&self, letter: &DeadLetter) -> Result<()> {
        let tenant = TenantSlug::parse(&letter.tenant)?;
        let pool = self.pool(&tenant, true).await?;
        sqlx::query(
            "INSERT INTO dead_letters (id, pipeline, job_kind, job, attempts, reason, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&letter.id)
        .bind(&letter.pipeline)
        .bind(&letter.job_kind)
        .bind(letter.job.to_string())
        .bind(letter.attempts.to_string())
        .bind(&letter.reason)
        .bind(letter.created_at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        .execute(&pool)
        .await
        .map_err(|e| EngineError::from_sqlx("recording a dead letter", e))?;
        Ok(())
    }

    async fn dead_letters(&self, tenant: &TenantSlug, limit: u32) -> Result<Vec<DeadLetter>> {
        let pool = self.pool(tenant, false).await?;
        let rows =
            sqlx::query("SELECT * FROM dead_letters ORDER BY created_at DESC, id DESC LIMIT ?")
                .bind(i64::from(limit))
                .fetch_all(&pool)
                .await
                .map_err(|e| EngineError::from_sqlx("listing dead letters", e))?;
        rows.iter()
            .map(|r| dead_letter_from_row(tenant, r))
            .collect()
    }

    async fn dead_letter(&self, tenant: &TenantSlug, id: &str) -> Result<Option<DeadLetter>> {
        let pool = self.pool(tenant, false).await?;
        let row = sqlx::query("SELECT * FROM dead_letters WHERE id = ?")
            .bind(id)
            .fetch_optional(&pool)
            .await
            .map_err(|e| EngineError::from_sqlx("reading a dead letter", e))?;
        row.map(|r| dead_letter_from_row(tenant, &r)).transpose()
    }

    async fn mark_dead_letter_replayed(
        &self,
        tenant: &TenantSlug,
        id: &str,
        run_id: &str,
    ) -> Result<bool> {
        let pool = self.pool(tenant, false).await?;
        let res = sqlx::query("UPDATE dead_letters SET replayed_at = ?, replay_run = ? WHERE id = ? AND replayed_at IS NULL")
            .bind(now_text())
            .bind(run_id)
            .bind(id)
            .execute(&pool)
            .await
            .map_err(|e| EngineError::from_sqlx("marking a dead letter replayed", e))?;
        Ok(res.rows_affected() == 1)
    }
}

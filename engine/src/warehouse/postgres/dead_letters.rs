//! Dead letters of the tenant: recorded, listed, marked replayed once.

use super::{PostgresWarehouse, db, table};
use crate::control::DeadLetter;
use crate::error::Result;
use crate::tenant::TenantSlug;
use crate::warehouse::rows::dead_letter_from_row;
use crate::warehouse::{DeadLetterStore, LoadStore};
use sqlx::AssertSqlSafe;

impl DeadLetterStore for PostgresWarehouse {
    async fn record_dead_letter(&self, letter: &DeadLetter) -> Result<()> {
        let tenant = TenantSlug::parse(&letter.tenant)?;
        self.prepare_tenant(&tenant).await?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (id, pipeline, job_kind, job, attempts, reason, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            table(&tenant, "dead_letters")
        )))
        .bind(&letter.id)
        .bind(&letter.pipeline)
        .bind(&letter.job_kind)
        .bind(sqlx::types::Json(&letter.job))
        .bind(sqlx::types::Json(&letter.attempts))
        .bind(&letter.reason)
        .bind(letter.created_at)
        .execute(&self.pool)
        .await
        .map_err(db("recording a dead letter"))?;
        Ok(())
    }

    async fn dead_letters(&self, tenant: &TenantSlug, limit: u32) -> Result<Vec<DeadLetter>> {
        self.prepare_tenant(tenant).await?;
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT * FROM {} ORDER BY created_at DESC, seq DESC LIMIT $1",
            table(tenant, "dead_letters")
        )))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing dead letters"))?;
        rows.iter()
            .map(|r| dead_letter_from_row(tenant, r))
            .collect()
    }

    async fn dead_letter(&self, tenant: &TenantSlug, id: &str) -> Result<Option<DeadLetter>> {
        self.prepare_tenant(tenant).await?;
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT * FROM {} WHERE id = $1",
            table(tenant, "dead_letters")
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("reading a dead letter"))?;
        row.map(|r| dead_letter_from_row(tenant, &r)).transpose()
    }

    async fn mark_dead_letter_replayed(
        &self,
        tenant: &TenantSlug,
        id: &str,
        run_id: &str,
    ) -> Result<bool> {
        self.prepare_tenant(tenant).await?;
        let res = sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET replayed_at = now(), replay_run = $1 WHERE id = $2 AND replayed_at IS NULL",
            table(tenant, "dead_letters")
        )))
        .bind(run_id)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(db("marking a dead letter replayed"))?;
        Ok(res.rows_affected() == 1)
    }
}
